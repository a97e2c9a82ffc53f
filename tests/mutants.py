"""Named core-logic mutations of every method, and the runner behind ``make mutants``.

Each mutant changes one line of one method's central mechanism (removes, inverts or replaces it) in a
copy of ``src/``; the method's tests must then fail ("killed"). A mutant that survives names a
mechanism the suite does not prove. ``python tests/mutants.py [--only NAME]`` runs them one at a time
and writes ``docs/results/mutants.md``; the unmutated code must pass each test selection first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    method: str
    name: str
    file: str  # under src/bitsmith/
    find: str  # must occur exactly once
    replace: str
    tests: str  # pytest arguments: files (and -k expressions)


M = Mutant
MUTANTS = [
    # -- the review's list (issue 38, item 13): one-line breaks of central mechanisms --------------------
    M(
        "brecq",
        "reconstruction error summed over every position (the regulariser 49-784x weaker)",
        "reconstruct.py",
        "return sum((a - b).abs().pow(p).sum(1).mean() for a, b in zip(pred, target, strict=True))",
        "return sum((a - b).abs().pow(p).flatten(1).sum(1).mean() for a, b in zip(pred, target, strict=True))",
        "tests/test_brecq.py -k averages_positions",
    ),
    M(
        "dverge",
        "deep-ensemble members get 1/M of their gradient",
        "methods/deep_ensemble.py",
        "        return sum(nn.functional.cross_entropy(member(x), y) for member in members)",
        "        return sum(nn.functional.cross_entropy(member(x), y) for member in members) / len(members)",
        "tests/test_ensemble.py -k own_loss",
    ),
    M(
        "awq",
        "the block's other linears quantized during the scale search",
        "methods/awq.py",
        "            with float_weights(others):",
        "            with float_weights([]):",
        "tests/test_llm.py -k attention_output",
    ),
    M(
        "gptq",
        "act-order walks the columns in ascending Hessian order",
        "methods/gptq.py",
        "perm = torch.argsort(torch.diag(H), descending=True)",
        "perm = torch.argsort(torch.diag(H), descending=False)",
        "tests/test_llm.py -k act_order_quantizes",
    ),
    M(
        "gptq",
        "true_sequential ignored (every layer's Hessian from the float block)",
        "methods/gptq.py",
        "order = topo.sequential_order(block) if true_sequential else [tuple(mine)]",
        "order = [tuple(mine)]",
        "tests/test_llm.py -k true_sequential",
    ),
    M(
        "awq",
        "each linear scored alone instead of the block output",
        "methods/awq.py",
        "        if inspected is not None and calls is not None:",
        "        if False:",
        "tests/test_llm.py -k attention_output",
    ),
    M(
        "mobiquant",
        "no clipping search",
        "methods/mobiquant.py",
        "            search_clipping(q, layer.weight, tokens.pow(2).mean(0), self.clip_slices, self.clip_grid)",
        "            pass",
        "tests/test_mobiquant.py",
    ),
    M(
        "npft",
        "outliers by weight magnitude instead of Fisher information",
        "methods/npft.py",
        "mask = outlier_mask(fisher[name], self.sensitivity)",
        "mask = outlier_mask(layer.weight.abs(), self.sensitivity)",
        "tests/test_npft.py -k fisher_information",
    ),
    M(
        "factorllm",
        "no straight-through router gradient",
        "moe.py",
        "gates = mask - probs.detach() + probs",
        "gates = mask",
        "tests/test_factorllm.py -k hard_top_k",
    ),
    M(
        "dverge",
        "no momentum in the feature distillation",
        "methods/dverge.py",
        "momentum = mu * momentum + grad /",
        "momentum = 0 * momentum + grad /",
        "tests/test_ensemble.py -k per_image",
    ),
    M(
        "dverge",
        "momentum normalised over the batch instead of per image",
        "methods/dverge.py",
        "grad / grad.abs().flatten(1).sum(1).clamp_min(1e-12).view(-1, *[1] * (grad.dim() - 1))",
        "grad / grad.abs().sum().clamp_min(1e-12)",
        "tests/test_ensemble.py -k per_image",
    ),
    M(
        "robust-eval",
        "ART told the inputs lie in [0, 255]",
        "robust/attacks.py",
        "nb_classes=classes, clip_values=(LOW, HIGH),",
        "nb_classes=classes, clip_values=(0.0, 255.0),",
        "tests/test_robust.py -k data_range",
    ),
    M(
        "robust-eval",
        "targeted label-space attack made untargeted",
        "robust/label_space.py",
        "return pgd_steps(model, x, x.clone(), target, spec, ascend=False)",
        "return pgd_steps(model, x, x.clone(), target, spec, ascend=True)",
        "tests/test_robust.py",
    ),
    M(
        "q-diffusion",
        "calibration pairs t with the next step's input",
        "eval/generative.py",
        "                if record is not None:\n                    record(int(t), x, eps)\n                x = scheduler.step(eps, t, x).prev_sample",
        "                x = scheduler.step(eps, t, x).prev_sample\n                if record is not None:\n                    record(int(t), x, eps)",
        "tests/test_qdiffusion.py -k own_time_step",
    ),
    M(
        "q-diffusion",
        "split one channel off",
        "qdiffusion.py",
        'splits[f"{name}.resnets.{i}.conv_shortcut"] = int(shortcut.in_channels) - skip',
        'splits[f"{name}.resnets.{i}.conv_shortcut"] = int(shortcut.in_channels) - skip + 1',
        "tests/test_qdiffusion.py",
    ),
    M(
        "sharpbalance",
        "random fixed subsets instead of the flattest samples",
        "methods/sharpbalance.py",
        "return sam_sets([flattest(per_sample_sharpness(m, x, y), self.flat_ratio) for m in members])",
        "return sam_sets([flattest(torch.rand(len(y), generator=torch.Generator().manual_seed(i)), self.flat_ratio) for i, m in enumerate(members)])",
        "tests/test_sharpbalance.py -k own_per_sample",
    ),
    # -- safety: a model directory's code never runs ------------------------------------------------------
    M(
        "security",
        "a config's auto_map is not refused",
        "zoo/hf_directory.py",
        "    refuse_remote_code(directory)\n",
        "",
        "tests/test_hf_directory.py -k code",
    ),
    M(
        "security",
        "transformers left to decide whether to trust a directory's code",
        "zoo/hf_directory.py",
        "result = load(directory, trust_remote_code=False, local_files_only=True, **extra)",
        "result = load(directory, local_files_only=True, **extra)",
        "tests/test_hf_directory.py -k trust",
    ),
    M(
        "security",
        "missing and unexpected weights ignored",
        "zoo/hf_directory.py",
        "    bad = {k: v for k, v in problems.items() if v}",
        "    bad = {}",
        "tests/test_hf_directory.py -k missing",
    ),
    M(
        "security",
        "config sizes not checked against the weights",
        "zoo/hf_directory.py",
        "    if parameters > MAX_CODES_PER_PARAMETER * stored:",
        "    if False:",
        "tests/test_hf_directory.py -k bounded",
    ),
    # -- LLM weight-only: GPTQ, AWQ, the sequential runner ---------------------------------------------
    M(
        "factorllm",
        "trained experts distilled from themselves (the teacher drifts)",
        "methods/factorllm.py",
        "teacher_model = copy.deepcopy(model).eval() if self.train_experts else model",
        "teacher_model = model",
        "tests/test_factorllm.py -k frozen_dense_teacher",
    ),
    M(
        "gemq",
        "1-bit coefficient candidates on the min-max {0, range} grid",
        "methods/gemq.py",
        'q = grouped_weight_quantizer("gemq", f"{name}.{proj}", layer, bits, group_size, bits == 1)',
        'q = grouped_weight_quantizer("gemq", f"{name}.{proj}", layer, bits, group_size, False)',
        "tests/test_gemq.py -k one_bit",
    ),
    M(
        "gptq",
        "binary groups scaled by max |w| instead of mean |w|",
        "methods/gptq.py",
        "self.scale[:, group] = weights.abs().mean(1).clamp(min=1e-8)",
        "self.scale[:, group] = weights.abs().amax(1).clamp(min=1e-8)",
        "tests/test_gemq.py -k one_bit",
    ),
    M(
        "sequential",
        "block keyword inputs cached per batch shape, whatever the padding mask",
        "sequential.py",
        "key = (tuple(_input_ids(batch).shape), None if mask is None else mask.numpy().tobytes())",
        "key = (tuple(_input_ids(batch).shape), None)",
        "tests/test_padding.py -k own_mask",
    ),
    M(
        "sequential",
        "blocks run without their batch's padding mask known to the statistics",
        "sequential.py",
        "with contextlib.suppress(StopBlock), real_token_mask(inputs.mask(index)):",
        "with contextlib.suppress(StopBlock), real_token_mask(None):",
        "tests/test_padding.py -k decoder_calibration",
    ),
    M(
        "gptq",
        "padding positions enter the Hessians",
        "methods/gptq.py",
        "x = drop_padding(args[0].detach()).reshape(-1, args[0].shape[-1]).float()",
        "x = args[0].detach().reshape(-1, args[0].shape[-1]).float()",
        "tests/test_padding.py -k decoder_calibration",
    ),
    M(
        "awq",
        "padding positions enter the activation means and the scale search",
        "methods/awq.py",
        "out.inputs[key].append(drop_padding(a[0].detach()))",
        "out.inputs[key].append(a[0].detach())",
        "tests/test_padding.py -k decoder_calibration",
    ),
    # -- data-parallel training (torch.distributed) -----------------------------------------------------
    M(
        "distributed",
        "each rank's loss not weighted by its share of the batch",
        "train.py",
        "(loss * weight if at.size > 1 else loss).backward()",
        "loss.backward()",
        "tests/test_distributed.py -k like_one",
    ),
    M(
        "distributed",
        "dynamic activation ranges from the rank's slice only",
        "quant/uniform.py",
        "lo, hi = distributed.batch_range(lo, hi)",
        "lo, hi = lo, hi",
        "tests/test_distributed.py -k like_one",
    ),
    M(
        "tune",
        "the least sensitive layers raised first",
        "tune.py",
        "trials = [Trial(k, order[:k],",
        "trials = [Trial(k, order[::-1][:k],",
        "tests/test_tune.py -k search",
    ),
    M(
        "tune",
        "bisection keeps the failing end",
        "tune.py",
        "new_high = min([k for k in ks if passed.get(k)] + [high])",
        "new_high = min([k for k in ks if not passed.get(k)] + [high])",
        "tests/test_tune.py -k search",
    ),
    M(
        "sweep",
        "a dominated run joins the Pareto front",
        "sweep.py",
        "if sign * value > best:",
        "if sign * value >= best - 1e9:",
        "tests/test_sweep.py -k front",
    ),
    M(
        "brecq",
        "the learned rounding discarded (nearest rounding written)",
        "reconstruct.py",
        "layer.weight.copy_(rounder.rounded_weight(layer.masked_weight()))",
        "layer.weight.copy_(rounder.base(layer.masked_weight()))",
        "tests/test_brecq.py",
    ),
    M(
        "brecq",
        "targets taken from the quantized model instead of the float one",
        "reconstruct.py",
        "    with float_layers(reference):\n        targets = ",
        "    with contextlib.nullcontext():\n        targets = ",
        "tests/test_brecq.py",
    ),
    M(
        "brecq",
        "targets from the model whose earlier units' rounding is already written (no float copy)",
        "reconstruct.py",
        "reference = copy.deepcopy(model)",
        "reference = model",
        "tests/test_brecq.py -k float_model",
    ),
    M(
        "brecq",
        "the two-pass mode learns the rounding with quantized activations",
        "reconstruct.py",
        "    with float_layers(model, weights=False):\n        result = ",
        "    with contextlib.nullcontext():\n        result = ",
        "tests/test_brecq.py -k two_pass",
    ),
    M(
        "q-diffusion",
        "calibration at one time step when asked for the uniform spread",
        "qdiffusion.py",
        "    if not uniform:\n        return [min(",
        "    if uniform:\n        return [min(",
        "tests/test_qdiffusion.py -k calibration_steps",
    ),
    M(
        "q-diffusion",
        "the skip-concatenation layers keep one joint grid",
        "methods/q_diffusion.py",
        "                split_layer(model.get_submodule(name), channel)",
        "                pass",
        "tests/test_qdiffusion.py -k splits_the_concatenation",
    ),
    M(
        "q-diffusion",
        "the exported split convolution drops half of its second channel group",
        "export/qdq.py",
        "return self.first(x[:, : self.split]) + self.second(x[:, self.split :])",
        "return self.first(x[:, : self.split]) + 0.5 * self.second(x[:, self.split :])",
        "tests/test_qdiffusion.py -k split_convolutions",
    ),
    # -- robustness: attacks, adversarial training ------------------------------------------------------
    M(
        "clat",
        "the criticality term's passes move the batch-norm statistics",
        "methods/clat.py",
        "        with frozen_norm_statistics(model):\n",
        "        with torch.enable_grad():\n",
        "tests/test_clat.py -k batch_norm",
    ),
    M(
        "clat",
        "critical layers never reselected",
        "methods/clat.py",
        "        if epoch % self.reselect_every or epoch == epochs:",
        "        if True:",
        "tests/test_clat.py -k reselected",
    ),
    M(
        "adv-train",
        "PGD steps descend the loss instead of ascending it",
        "robust/attacks.py",
        "alpha = spec.alpha if ascend else -spec.alpha",
        "alpha = -spec.alpha if ascend else spec.alpha",
        "tests/test_robust.py",
    ),
    M(
        "adv-train",
        "training batch left clean",
        "methods/adv_train.py",
        "return pgd(model, x, y, self.spec(self.eps)), y",
        "return x, y",
        "tests/test_robust.py",
    ),
    M(
        "mat",
        "mixed MAT drops the clean examples",
        "methods/mat.py",
        "return torch.cat([x, *crafted]), y.repeat(len(crafted) + 1)",
        "return torch.cat(crafted), y.repeat(len(crafted))",
        "tests/test_robust.py",
    ),
    M(
        "mat",
        "max MAT keeps the weakest strength",
        "methods/mat.py",
        "worst = losses.argmax(0)",
        "worst = losses.argmin(0)",
        "tests/test_robust.py",
    ),
    M(
        "dverge",
        "each member trained on its own distilled images",
        "methods/dverge.py",
        "                if i != j:",
        "                if i == j:",
        "tests/test_ensemble.py",
    ),
    M(
        "dverge",
        "distillation ascends the feature distance",
        "methods/dverge.py",
        "adv = adv.detach() - step_size * momentum.sign()",
        "adv = adv.detach() + step_size * momentum.sign()",
        "tests/test_ensemble.py",
    ),
    M(
        "ensemble",
        "ensemble averages logits instead of probabilities",
        "ensemble.py",
        "log_probs = torch.log_softmax(member_logits, dim=-1)",
        "log_probs = member_logits",
        "tests/test_ensemble.py",
    ),
    M(
        "clat",
        "least critical layers selected first",
        "methods/clat.py",
        "for name in sorted(scores, key=scores.get, reverse=True):",
        "for name in sorted(scores, key=scores.get):",
        "tests/test_clat.py",
    ),
    M(
        "clat",
        "nothing frozen",
        "methods/clat.py",
        "p.requires_grad_(id(p) in trainable)",
        "p.requires_grad_(True)",
        "tests/test_clat.py tests/test_safer.py",
    ),
    M(
        "clat",
        "criticality term dropped",
        "methods/clat.py",
        "return self.lam * sum(criticality(clean, adversarial).values())",
        "return torch.zeros(())",
        "tests/test_clat.py",
    ),
    M(
        "hce",
        "diversity penalised instead of rewarded",
        "methods/hce.py",
        "- self.mu * non_target_diversity(logits, y)",
        "+ self.mu * non_target_diversity(logits, y)",
        "tests/test_hce.py",
    ),
    M(
        "hce",
        "the true class kept in the diversity distributions",
        "methods/hce.py",
        "keep = torch.ones_like(logits[0], dtype=torch.bool).scatter_(1, y[:, None], False)",
        "keep = torch.ones_like(logits[0], dtype=torch.bool).scatter_(1, (y[:, None] + 1) % logits.shape[-1], False)",
        "tests/test_hce.py",
    ),
    M(
        "safer",
        "SAM never steps back to theta",
        "sam.py",
        "                p.sub_(step)",
        "                pass",
        "tests/test_safer.py",
    ),
    M(
        "safer",
        "the flattest layers selected",
        "methods/safer.py",
        "self._selected = sorted(scores, key=scores.get, reverse=True)[: self.layers]",
        "self._selected = sorted(scores, key=scores.get)[: self.layers]",
        "tests/test_safer.py",
    ),
    M(
        "safer",
        "plain gradient instead of SAM's",
        "methods/safer.py",
        "        self._sam.ascend(params, nn.functional.cross_entropy(model(x), y))\n",
        "",
        "tests/test_safer.py",
    ),
    M(
        "sharpbalance",
        "sharpest samples taken instead of the flattest",
        "methods/sharpbalance.py",
        "mask[sharpness.argsort()[: round(ratio * len(sharpness))]] = True",
        "mask[sharpness.argsort(descending=True)[: round(ratio * len(sharpness))]] = True",
        "tests/test_sharpbalance.py",
    ),
    M(
        "sharpbalance",
        "SAM on the member's own flattest set instead of the others'",
        "methods/sharpbalance.py",
        "others = torch.stack([f for j, f in enumerate(flat) if j != i]).any(0)",
        "others = flat[i]",
        "tests/test_sharpbalance.py",
    ),
    M(
        "sharpbalance",
        "SGD part's gradient dropped",
        "methods/sharpbalance.py",
        "            p.grad = g.clone() if p.grad is None else p.grad + g\n",
        "            pass\n",
        "tests/test_sharpbalance.py",
    ),
    M(
        "split-ensemble",
        "branch softmax without its OOD class",
        "split_ensemble.py",
        "torch.log_softmax(logits, dim=-1)[:, : len(group)]",
        "torch.log_softmax(logits[:, : len(group)], dim=-1)",
        "tests/test_split_ensemble.py",
    ),
    M(
        "split-ensemble",
        "other groups' samples ignored instead of taught as OOD",
        "split_ensemble.py",
        "table = torch.full((self.classes,), len(group), dtype=torch.long, device=y.device)",
        "table = torch.full((self.classes,), -100, dtype=torch.long, device=y.device)",
        "tests/test_split_ensemble.py",
    ),
    M(
        "split-ensemble",
        "OOD class weighted by its frequency instead of its inverse",
        "methods/split_ensemble.py",
        "else 1.0 / (model.classes - size)",
        "else float(model.classes - size)",
        "tests/test_split_ensemble.py",
    ),
    M(
        "label-space",
        "proxy is the least related surrogate class",
        "robust/label_space.py",
        "proxy = int(matrix[:, target].argmax())",
        "proxy = int(matrix[:, target].argmin())",
        "tests/test_robust.py",
    ),
    M(
        "ensemble",
        "deep ensemble trains the averaged prediction instead of each member",
        "methods/deep_ensemble.py",
        "return sum(nn.functional.cross_entropy(member(x), y) for member in members) / len(members)",
        "return nn.functional.cross_entropy(model(x), y)",
        "tests/test_ensemble.py",
    ),
    M(
        "robust-eval",
        "transfer examples crafted on the evaluated model",
        "robust/evaluate.py",
        "crafted = pgd(source, images, labels, transfer_spec)",
        "crafted = pgd(model, images, labels, transfer_spec)",
        "tests/test_robust.py",
    ),
    M(
        "factorllm",
        "pseudo-labels are the experts farthest from the dense output",
        "moe.py",
        "(-mse).topk(top_k, -1)",
        "mse.topk(top_k, -1)",
        "tests/test_factorllm.py",
    ),
    M(
        "factorllm",
        "router not trained in the PA stage",
        "methods/factorllm.py",
        "        optimizer.step()\n    with torch.no_grad():",
        "        pass\n    with torch.no_grad():",
        "tests/test_factorllm.py",
    ),
    M(
        "factorllm",
        "output not rescaled by E / k",
        "moe.py",
        "return (out * (self.num_experts / self.top_k)).reshape(shape)",
        "return out.reshape(shape)",
        "tests/test_factorllm.py",
    ),
    M(
        "factorllm",
        "all experts run on every token",
        "moe.py",
        "rows = mask[:, e].nonzero().squeeze(1)",
        "rows = torch.arange(mask.shape[0])",
        "tests/test_factorllm.py",
    ),
    M(
        "gemq",
        "coefficients not gradient-weighted",
        "methods/gemq.py",
        "(g2[rows] * (scale",
        "(torch.ones_like(g2[rows]) * (scale",
        "tests/test_gemq.py",
    ),
    M(
        "gemq",
        "global allocation solved layer by layer",
        "methods/gemq.py",
        'groups = [list(sizes)] if self.allocation == "global" else',
        'groups = [list(sizes)] if self.allocation == "none" else',
        "tests/test_gemq.py",
    ),
    M(
        "gemq",
        "experts quantized at the widest candidate, not their allocation",
        "methods/gemq.py",
        'overrides = {f"{u}.{p}": {"bits": b, **(',
        'overrides = {f"{u}.{p}": {"bits": max(self.candidates), **(',
        "tests/test_gemq.py",
    ),
    M(
        "gemq",
        "gradients taken at the wrong place (the block input)",
        "methods/gemq.py",
        "handles = [moe.register_forward_hook(keep(name)) for name, moe in moes.items()]",
        "handles = [moe.register_forward_pre_hook(lambda m, a, n=name: keep(n)(m, a, a[0])) for name, moe in moes.items()]",
        "tests/test_gemq.py",
    ),
    M(
        "pat",
        "HSM transform not folded into the writer",
        "methods/pat.py",
        "t = self.scale[:, None] * (torch.eye(self.up.shape[0]) + self.up @ self.down)",
        "t = self.scale[:, None] * torch.eye(self.up.shape[0])",
        "tests/test_pat.py",
    ),
    M(
        "pat",
        "HSM does not apply the shared mask",
        "methods/pat.py",
        "return (x + F.linear(F.linear(x, self.down), self.up)) * self.scale * mask",
        "return (x + F.linear(F.linear(x, self.down), self.up)) * self.scale",
        "tests/test_pat.py",
    ),
    M(
        "pat",
        "kept-channel count without its straight-through gradient",
        "methods/pat.py",
        "count = (binary - self.logits.detach() + self.logits).sum()",
        "count = binary.sum()",
        "tests/test_pat.py",
    ),
    M(
        "pat",
        "no RMSNorm compensation when channels are removed",
        "hidden.py",
        "gain = math.sqrt(hidden / kept)",
        "gain = 1.0",
        "tests/test_pat.py tests/test_hidden.py",
    ),
    M(
        "hidden-prune",
        "the lowest-scoring channels kept",
        "hidden.py",
        "keep[scores.topk(target).indices] = True",
        "keep[(-scores).topk(target).indices] = True",
        "tests/test_hidden.py",
    ),
    M(
        "t-rex",
        "one routing matrix for every token (the mean)",
        "methods/trex.py",
        'mixed = torch.einsum("...i,...ij->...j", x @ self.A.T, routing)',
        'mixed = torch.einsum("...i,...ij->...j", x @ self.A.T, routing.reshape(-1, self.r1, self.r2).mean(0))',
        "tests/test_trex.py",
    ),
    M(
        "t-rex",
        "semantic prior ignored",
        "methods/trex.py",
        "        prior = PRIOR.get()\n",
        "        prior = None\n",
        "tests/test_trex.py",
    ),
    M(
        "liftquant",
        "codebook M not trained",
        "quant/lattice.py",
        "                optimizer.step()",
        "                pass",
        "tests/test_liftquant.py",
    ),
    M(
        "liftquant",
        "one padding only: no candidate search",
        "quant/lattice.py",
        "pads = sign_table(self.n - self.m).to(z)",
        "pads = sign_table(self.n - self.m).to(z)[:1]",
        "tests/test_liftquant.py",
    ),
    M(
        "liftquant",
        "no error feedback: the vector's error is not propagated",
        "methods/liftquant.py",
        "                W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)",
        "                pass",
        "tests/test_liftquant.py",
    ),
    M(
        "liftquant",
        "no Hadamard rotation",
        "quant/lift.py",
        "    return (weight.reshape(*weight.shape[:-1], -1, block) @ h).reshape(weight.shape)",
        "    return weight",
        "tests/test_liftquant.py",
    ),
    M(
        "liftquant",
        "one scale for every row",
        "quant/lift.py",
        "    return weight.pow(2).mean(-1).sqrt().clamp(min=TINY)",
        "    return weight.pow(2).mean().sqrt().clamp(min=TINY).expand(weight.shape[0])",
        "tests/test_liftquant.py",
    ),
    M(
        "mobiquant",
        "router trained on inverted gains",
        "methods/mobiquant.py",
        "        goal = torch.log(gains / budget_weight).T  # (T, E-1)",
        "        goal = -torch.log(gains / budget_weight).T  # (T, E-1)",
        "tests/test_mobiquant.py",
    ),
    M(
        "mobiquant",
        "fewer slices re-round instead of dropping LSBs",
        "quant/slices.py",
        'torch.div(codes, 2**r, rounding_mode="floor")',
        "torch.round(codes / 2**r).clamp(max=2 ** (total * slice_bits - r) - 1)",
        "tests/test_mobiquant.py",
    ),
    M(
        "npft",
        "outliers at random positions",
        "methods/npft.py",
        "    mask[torch.topk(fisher.reshape(-1), count).indices] = True",
        "    mask[torch.randperm(fisher.numel())[:count]] = True",
        "tests/test_npft.py",
    ),
    M(
        "npft",
        "noise not zero-mean",
        "methods/npft.py",
        "        noise[row, mask[row]] = u - u.mean()",
        "        noise[row, mask[row]] = u",
        "tests/test_npft.py",
    ),
    M(
        "npft",
        "clean base not restored after a round",
        "methods/npft.py",
        "                    layer.weight.copy_(clean[name])",
        "                    pass",
        "tests/test_npft.py",
    ),
    M(
        "npft",
        "no noise written",
        "methods/npft.py",
        "                layer.weight.add_(outlier_noise(layer.weight, mask, generator))",
        "                pass",
        "tests/test_npft.py",
    ),
    M(
        "precision-routing",
        "router trained on inverted KL",
        "methods/precision_routing.py",
        "targets.append(torch.log(",
        "targets.append(-torch.log(",
        "tests/test_precision_routing.py",
    ),
    M(
        "export-ct",
        "zero points not shifted to signed codes",
        "export/compressed_tensors.py",
        "shift = 2 ** (q.bits - 1)",
        "shift = 0",
        "tests/test_compressed_tensors.py",
    ),
    M(
        "gptq",
        "no error feedback inside a block",
        "methods/gptq.py",
        "            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)",
        "            pass",
        "tests/test_llm.py",
    ),
    M(
        "gptq",
        "no lazy update of later blocks",
        "methods/gptq.py",
        "        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]",
        "        pass",
        "tests/test_llm.py",
    ),
    M(
        "gptq",
        "act-order permutation not undone",
        "methods/gptq.py",
        "    return Q[:, torch.argsort(perm)], params",
        "    return Q, params",
        "tests/test_llm.py",
    ),
    M(
        "awq",
        "no scale search (ratio 0 only)",
        "methods/awq.py",
        "        scales = x_mean.pow(ratio).clamp(min=1e-4)",
        "        scales = x_mean.pow(0.0).clamp(min=1e-4)",
        "tests/test_llm.py",
    ),
    M(
        "awq",
        "scales not folded into the feeder",
        "methods/awq.py",
        "            topo.divide_feeder(block, group, scales)",
        "            pass",
        "tests/test_llm.py",
    ),
    M(
        "gptq",
        "blocks fed by the float model",
        "sequential.py",
        "        compress_block(name, block, inputs, topology)\n        hidden = run_block(block, inputs)",
        "        hidden = run_block(block, inputs)\n        compress_block(name, block, inputs, topology)",
        "tests/test_llm.py",
    ),
    # -- quantization: post-training ---------------------------------------------------------------
    M(
        "ptq",
        "weights not quantized",
        "methods/ptq.py",
        'if c["w_bits"] is None:\n            return None\n        return uniform',
        "if True:\n            return None\n        return uniform",
        "tests/test_ptq_methods.py",
    ),
    M(
        "ptq",
        "inputs never calibrated",
        "methods/ptq.py",
        "        inputs = [model.get_submodule(name).input_q for name in self._layers]",
        "        inputs = []",
        "tests/test_ptq_methods.py",
    ),
    M(
        "ptq",
        "granularity ignored",
        "methods/ptq.py",
        'c["w_bits"], c["w_granularity"]',
        'c["w_bits"], "tensor"',
        "tests/test_ptq_methods.py",
    ),
    M(
        "rtn",
        "symmetric grid instead of the asymmetric default",
        "methods/rtn.py",
        'c["group_size"], c["symmetric"], "minmax"',
        'c["group_size"], True, "minmax"',
        "tests/test_ptq_methods.py",
    ),
    M(
        "rtn",
        "per-channel instead of per-group scales",
        "methods/rtn.py",
        'c["bits"], "group", c["group_size"]',
        'c["bits"], "channel", c["group_size"]',
        "tests/test_ptq_methods.py",
    ),
    M(
        "rtn",
        "one bit more",
        "methods/rtn.py",
        'uniform_weight_quantizer(name, layer, c["bits"],',
        'uniform_weight_quantizer(name, layer, c["bits"] + 1,',
        "tests/test_ptq_methods.py",
    ),
    M(
        "deploy",
        "torchao: the shared-input Linear fusion not run",
        "export/pt2e.py",
        "        fuse_shared_input_linears(graph)\n",
        "",
        "tests/test_deploy.py",
    ),
    M(
        "deploy",
        "auto: the float comparison inverted",
        "deploy.py",
        'if timings[best.backend] > timings["float"]:',
        'if timings[best.backend] < timings["float"]:',
        "tests/test_deploy.py",
    ),
    M(
        "deploy",
        "fused q / k / v: every slice taken from the start",
        "export/graph_passes.py",
        "            start += width\n",
        "            start += 0\n",
        "tests/test_graph_passes.py",
    ),
    M(
        "deploy",
        "shared constants: merged by shape, not by value",
        "export/graph_passes.py",
        'kind, key = "const", (value.dtype, tuple(value.shape), value.detach().cpu().numpy().tobytes())',
        'kind, key = "const", (value.dtype, tuple(value.shape))',
        "tests/test_graph_passes.py",
    ),
    M(
        "deploy",
        "residual adds: only the first input of each add quantized",
        "quant/residual.py",
        'for name in pair if operands == "both" else pair[1:]:',
        'for name in pair[:1] if operands == "both" else pair[1:]:',
        "tests/test_residual_adds.py",
    ),
    M(
        "deploy",
        "residual adds, shortcut mode: the convolution branch quantized instead",
        "quant/residual.py",
        'for name in pair if operands == "both" else pair[1:]:',
        'for name in pair if operands == "both" else pair[:1]:',
        "tests/test_residual_adds.py",
    ),
    M(
        "deploy",
        "pool_inputs: the pool's output quantized instead of its input",
        "nn/activation.py",
        "        return self.inner(self.quantize(x))",
        "        return self.quantize(self.inner(x))",
        "tests/test_residual_adds.py",
    ),
    M(
        "deploy",
        "pool_inputs: exported after the pool",
        "export/qdq.py",
        "return self.inner(self.quantize(x)) if self.before else self.quantize(self.inner(x))",
        "return self.quantize(self.inner(x))",
        "tests/test_residual_adds.py",
    ),
    M(
        "deploy",
        "ONNX: no quantize step copied in front of a Flatten",
        "export/onnx.py",
        'shape_op.op_type not in ("Flatten", "Reshape")',
        "shape_op.op_type not in ()",
        "tests/test_residual_adds.py",
    ),
    M(
        "deploy",
        "ONNX: equal quantize steps of one tensor not merged",
        "export/onnx.py",
        "                if key in seen:",
        "                if False:",
        "tests/test_residual_adds.py",
    ),
    M(
        "deploy",
        "residual adds: output quantizers never calibrated",
        "methods/ptq.py",
        "observe(model, [*inputs, *(model.get_submodule(name).quantizer for name in self._activations)], batches)",
        "observe(model, inputs, batches)",
        "tests/test_residual_adds.py",
    ),
    M(
        "deploy",
        "int8 attention: value scales per token (no integer P V)",
        "quant/attention.py",
        "v, v_scale = symmetric_codes(value, -2)",
        "v, v_scale = symmetric_codes(value, -1)",
        "tests/test_int8_attention.py",
    ),
    M(
        "deploy",
        "int8 attention: padding mask ignored",
        "quant/attention.py",
        "    if attention_mask is not None:",
        "    if False:",
        "tests/test_int8_attention.py",
    ),
    M(
        "deploy",
        "int8 attention: probabilities left in float",
        "quant/attention.py",
        "    p = probability_codes(probs)",
        "    p = probs * 255",
        "tests/test_int8_attention.py",
    ),
    M(
        "deploy",
        "int8 attention: a checkpoint does not switch it on again on load",
        "export/checkpoint.py",
        'if metadata.get("attention") == "int8":',
        'if metadata.get("attention") == "none":',
        "tests/test_int8_attention.py",
    ),
    M(
        "deploy",
        "int8 attention: PTQ's option ignored",
        "methods/ptq.py",
        "        if self.int8_attention:",
        "        if False:",
        "tests/test_int8_attention.py",
    ),
    M(
        "smoothquant",
        "alpha and 1 - alpha swapped",
        "methods/smoothquant.py",
        "scale = a_max.clamp(min=1e-5).pow(self.alpha) / w_max.clamp(min=1e-5).pow(1 - self.alpha)",
        "scale = a_max.clamp(min=1e-5).pow(1 - self.alpha) / w_max.clamp(min=1e-5).pow(self.alpha)",
        "tests/test_noisyquant.py tests/test_ptq_methods.py",
    ),
    M(
        "smoothquant",
        "weights not rescaled",
        "nn/quantized.py",
        "self.weight.mul_(scale.to(self.weight)[None, :])",
        "pass",
        "tests/test_noisyquant.py tests/test_ptq_methods.py",
    ),
    M(
        "smoothquant",
        "scale from the weights only",
        "methods/smoothquant.py",
        "w_max = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)",
        "w_max, a_max = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0), torch.ones_like(a_max)",
        "tests/test_noisyquant.py tests/test_ptq_methods.py tests/test_llm.py",
    ),
    M(
        "smoothquant",
        "feeder fold: the feeder's rows not divided (the check must then reject the fold)",
        "methods/smoothquant.py",
        "            saved = _divide_outputs(feeder, scale)\n",
        "            saved = feeder.weight.detach().clone(), None if feeder.bias is None else feeder.bias.detach().clone()\n",
        "tests/test_ptq_methods.py",
    ),
    M(
        "smoothquant",
        "decoder path: 1/s not folded into the feeder",
        "methods/smoothquant.py",
        "topo.divide_feeder(block, group, scale)",
        "pass",
        "tests/test_llm.py",
    ),
    M(
        "smoothquant",
        "decoder path: weights not multiplied by s",
        "methods/smoothquant.py",
        "layer.weight.mul_(scale.to(layer.weight)[None, :])\n            for n in group.linears:",
        "pass\n            for n in group.linears:",
        "tests/test_llm.py",
    ),
    M(
        "noisyquant",
        "no mean shift",
        "methods/noisyquant.py",
        "mu = grid_search(lambda m: error(quantizer, m * step), -1.0, 1.0, self.grid, keep=0.0) * step",
        "mu = 0.0",
        "tests/test_noisyquant.py",
    ),
    M(
        "noisyquant",
        "no clip search",
        "methods/noisyquant.py",
        "if self.clip_search and _searchable(quantizer):",
        "if False:",
        "tests/test_noisyquant.py",
    ),
    M(
        "noisyquant",
        "no noise",
        "methods/noisyquant.py",
        "noise = mu + k * u",
        "noise = mu + 0 * u",
        "tests/test_noisyquant.py",
    ),
    M(
        "noisyquant",
        "clip candidates from the row subsample",
        "methods/noisyquant.py",
        "self._clip(quantizer, full_range, error)",
        "self._clip(quantizer, (float(rows.min()), float(rows.max())), error)",
        "tests/test_padding.py",
    ),
    M(
        "ptq",
        "padding enters the observers",
        "quant/uniform.py",
        "self._observer.update(self.rows(drop_padding(x.detach())).float())",
        "self._observer.update(self.rows(x.detach()).float())",
        "tests/test_padding.py",
    ),
    M(
        "smoothquant",
        "padding enters the activation maxima",
        "methods/smoothquant.py",
        "m = drop_padding(x.detach()).abs()",
        "m = x.detach().abs()",
        "tests/test_padding.py",
    ),
    M(
        "mixed",
        "causal LM scored against its own argmax, not the next token",
        "methods/mixed.py",
        'return inputs, inputs["input_ids"][:, 1:]',
        "return inputs, output_logits(run_forward(model, inputs)).argmax(-1)[:, 1:]",
        "tests/test_llm.py",
    ),
    M(
        "mixed",
        "padding enters the activation candidates",
        "methods/mixed.py",
        "self._inputs = {name: drop_padding(x.detach()) for name, x in inputs.items()}",
        "self._inputs = {name: x.detach() for name, x in inputs.items()}",
        "tests/test_padding.py",
    ),
    M(
        "mixed",
        "sensitivities ignored",
        "methods/mixed.py",
        "b: weight_s[name] * _error(q, model.get_submodule(name).weight)",
        "b: 1.0 * _error(q, model.get_submodule(name).weight)",
        "tests/test_mixed.py",
    ),
    M(
        "mixed",
        "critical objective ignored",
        "methods/mixed.py",
        "            loss = loss + self.critical_weight * critical_loss(logits, labels, self.critical, reduction)",
        "            pass",
        "tests/test_mixed.py",
    ),
    M(
        "mixed",
        "budget ignored",
        "methods/mixed.py",
        "        picked = allocate(cost, budgets)",
        "        picked = allocate(cost, [])",
        "tests/test_mixed.py",
    ),
    M(
        "mixed",
        "negative traces by abs()",
        "methods/mixed.py",
        "return {name: max(value, 0.0) for name, value in measured.items()}",
        "return {name: abs(value) for name, value in measured.items()}",
        "tests/test_mixed.py",
    ),
    M(
        "mixed",
        "user override not fixed",
        "methods/mixed.py",
        'weights = [fixed["w_bits"]] if "w_bits" in fixed else self.candidates',
        "weights = self.candidates",
        "tests/test_mixed.py",
    ),
    # -- quantization: training-time ---------------------------------------------------------------
    M(
        "qat",
        "no batch-norm folding",
        "methods/qat.py",
        "self._pairs = conv_bn_pairs(model, convs) if convs else {}",
        "self._pairs = {}",
        "tests/test_qat.py",
    ),
    M(
        "bsq",
        "planes never clamped",
        "methods/bsq.py",
        "        for _, _, q in bitplane_layers(model, self._layers):\n            q.clamp_planes_(0.0, 2.0)\n\n    def schedule",
        "        pass\n\n    def schedule",
        "tests/test_bsq.py",
    ),
    M(
        "bsq",
        "no group Lasso",
        "methods/bsq.py",
        "q.pos[0].numel() * q.bits / total * group_lasso(q)",
        "q.pos[0].numel() * q.bits / total * 0 * group_lasso(q)",
        "tests/test_bsq.py",
    ),
    M(
        "bsq",
        "fine-tune skipped (never frozen)",
        "methods/bsq.py",
        "self._frozen = self.finetune_epochs > 0 and epoch >= epochs - self.finetune_epochs",
        "self._frozen = False",
        "tests/test_bsq.py",
    ),
    M(
        "bsq",
        "clipped gradient in the fixed fine-tune",
        "methods/bsq.py",
        'RoundClampQuantizer(q.bits, gradient="identity")',
        "RoundClampQuantizer(q.bits)",
        "tests/test_bsq.py",
    ),
    M(
        "msq",
        "Hessian rule inverted",
        "methods/msq.py",
        "sorted(names, key=lambda n: traces[n])[:count]",
        "sorted(names, key=lambda n: -traces[n])[:count]",
        "tests/test_msq.py",
    ),
    M(
        "msq",
        "no LSB penalty",
        "methods/msq.py",
        "(q.lsb(layer.masked_weight()) * q.step).sum()",
        "0 * (q.lsb(layer.masked_weight()) * q.step).sum()",
        "tests/test_msq.py",
    ),
    M(
        "msq",
        "LSB never dropped",
        "methods/msq.py",
        "        for _ in range(min(allowed, q.bits - self.min_bits)):",
        "        for _ in range(0):",
        "tests/test_msq.py",
    ),
    M(
        "csq",
        "no temperature annealing",
        "methods/csq.py",
        "q.beta.fill_(self.t_final ** (epoch / ticket))",
        "q.beta.fill_(1.0)",
        "tests/test_csq.py",
    ),
    M(
        "csq",
        "no ticket",
        "methods/csq.py",
        "                q.hard_mask.fill_(True)",
        "                pass",
        "tests/test_csq.py",
    ),
    M(
        "csq",
        "size-weighted budget computed per layer",
        "methods/csq.py",
        'if budget == "layers":',
        "if True:",
        "tests/test_csq.py",
    ),
    M(
        "csq",
        "budget sign ignored",
        "methods/csq.py",
        "over = selected_fraction(quantizers, self.budget) - self.target_bits / self.start_bits",
        "over = 1.0",
        "tests/test_csq.py",
    ),
    M(
        "hero",
        "no Hessian term",
        "methods/hero.py",
        "return surrogate - surrogate.detach() + gamma * norm",
        "return gamma * norm",
        "tests/test_hero.py",
    ),
    M(
        "hero",
        "gradient not normalised",
        "methods/hero.py",
        "scale = radius / norm.clamp(min=1e-12)",
        "scale = radius",
        "tests/test_hero.py",
    ),
    M(
        "sam",
        "gradient at the unperturbed point",
        "methods/hero.py",
        "moved = gradient({name: p + scale * gi",
        "moved = gradient({name: p + 0 * scale * gi",
        "tests/test_hero.py",
    ),
    M(
        "fisher-reg",
        "no Fisher term",
        "methods/fisher_reg.py",
        "return self.lam * ",
        "return 0 * self.lam * ",
        "tests/test_mixed.py",
    ),
    M(
        "qat",
        "batch norms never frozen",
        "methods/qat.py",
        "                model.get_submodule(conv).weight_q.freeze()",
        "                pass",
        "tests/test_qat.py",
    ),
    M(
        "qat",
        "LSQ step not learned",
        "methods/qat.py",
        'return UniformQuantizer(c["w_bits"], True, "channel", ch_axis=0, step="learned")',
        'return UniformQuantizer(c["w_bits"], True, "channel", ch_axis=0, dynamic=True)',
        "tests/test_qat.py",
    ),
    M(
        "qat",
        "batch norm not folded at finalize",
        "methods/qat.py",
        "            fold_batchnorm(model.get_submodule(conv), model.get_submodule(bn))",
        "            pass",
        "tests/test_qat.py",
    ),
    M(
        "hero",
        "gamma ignored",
        "methods/hero.py",
        "return finite_difference_penalty(model, batch, self.gamma, self.radius)",
        "return finite_difference_penalty(model, batch, 0.1, self.radius)",
        "tests/test_hero.py",
    ),
    M(
        "sam",
        "radius not rho",
        "methods/hero.py",
        "return finite_difference_penalty(model, batch, self.rho, self.rho)",
        "return finite_difference_penalty(model, batch, self.rho, 2 * self.rho)",
        "tests/test_hero.py",
    ),
    M(
        "sam",
        "batch-norm statistics updated by the extra passes",
        "methods/hero.py",
        "            module._buffers[name] = buffer.clone()",
        "            pass",
        "tests/test_hero.py",
    ),
    M(
        "fisher-reg",
        "gradient not squared",
        "methods/fisher_reg.py",
        "return sum((g.pow(2).sum() for g in grads), torch.zeros(()))",
        "return sum((g.abs().sum() for g in grads), torch.zeros(()))",
        "tests/test_mixed.py",
    ),
    M(
        "fisher-reg",
        "all classes instead of the critical ones",
        "methods/fisher_reg.py",
        "loss = critical_loss(model(inputs), labels, classes)",
        "loss = torch.nn.functional.cross_entropy(model(inputs), labels)",
        "tests/test_mixed.py",
    ),
    # -- sparsity and low rank ---------------------------------------------------------------------
    M(
        "prune",
        "keeps the smallest weights",
        "sparsity.py",
        "mask[torch.argsort(scores.detach(), stable=True)[:drop]] = False",
        "mask[torch.argsort(scores.detach(), stable=True, descending=True)[:drop]] = False",
        "tests/test_sparsity.py",
    ),
    M(
        "prune",
        "no gradual schedule",
        "methods/prune.py",
        "self.apply(model, self.sparsity * (1 - (1 - epoch / ramp_epochs) ** 3))",
        "pass",
        "tests/test_sparsity.py",
    ),
    M(
        "prune",
        "N:M keeps the smallest",
        "sparsity.py",
        "groups.topk(n, dim=-1).indices",
        "groups.topk(n, dim=-1, largest=False).indices",
        "tests/test_sparsity.py",
    ),
    M(
        "deephoyer",
        "no regulariser",
        "methods/deephoyer.py",
        "return self.lam * sum(regularizer(model.get_submodule(n).masked_weight()) for n in self._layers)",
        "return 0 * sum(regularizer(model.get_submodule(n).masked_weight()) for n in self._layers)",
        "tests/test_sparsity.py",
    ),
    M(
        "deephoyer",
        "never prunes",
        "methods/deephoyer.py",
        "                layer.set_mask(threshold_mask(w, self.sensitivity))",
        "                pass",
        "tests/test_sparsity.py",
    ),
    M(
        "deephoyer",
        "Hoyer instead of Hoyer-square",
        "sparsity.py",
        "return w.abs().sum().pow(2) / (w.pow(2).sum() + EPS)",
        "return w.abs().sum() / (w.pow(2).sum().sqrt() + EPS)",
        "tests/test_sparsity.py",
    ),
    M(
        "svd-train",
        "no singular-value regulariser",
        "methods/svd_train.py",
        "total = total + self.lam_s * sum(regularizer(layer.s * layer.keep) for layer in layers)",
        "pass",
        "tests/test_svd_train.py",
    ),
    M(
        "svd-train",
        "no orthogonality term",
        "methods/svd_train.py",
        "total = self.lam_o * sum(layer.orthogonality() for layer in layers)",
        "total = 0 * sum(layer.orthogonality() for layer in layers)",
        "tests/test_svd_train.py",
    ),
    M(
        "svd-train",
        "keeps the smallest singular values",
        "methods/svd_train.py",
        "order = torch.argsort(power, descending=True)",
        "order = torch.argsort(power)",
        "tests/test_svd_train.py",
    ),
    M(
        "bitslice",
        "no slice regulariser",
        "methods/bitslice.py",
        "total = total + sum(s.abs().sum() for s in slices) / len(slices)",
        "pass",
        "tests/test_bitslice.py",
    ),
    M(
        "bitslice",
        "no pruning threshold",
        "methods/bitslice.py",
        "layer.set_mask(layer.weight.detach().abs() >= self.prune_threshold)",
        "pass",
        "tests/test_bitslice.py",
    ),
    M(
        "bitslice",
        "slices not subtracted",
        "methods/bitslice.py",
        "rest = rest - unit * value.detach()",
        "rest = rest",
        "tests/test_bitslice.py",
    ),
    M(
        "nvit",
        "random saliency",
        "methods/nvit.py",
        "scores = {key: sum(self._ema[k] for k in self._with_v(key)) for key in keys}",
        "scores = {key: torch.rand_like(sum(self._ema[k] for k in self._with_v(key))) for key in keys}",
        "tests/test_nvit.py",
    ),
    M(
        "nvit",
        "highest scores pruned",
        "methods/nvit.py",
        "return sorted(ranked, key=lambda item: item[0])",
        "return sorted(ranked, key=lambda item: -item[0])",
        "tests/test_nvit.py",
    ),
    M(
        "nvit",
        "Taylor score without the gradient",
        "methods/nvit.py",
        "lambda p: p * p.grad if p.grad is not None else torch.zeros_like(p)",
        "lambda p: p * p",
        "tests/test_nvit.py",
    ),
]


def run_tests(src: Path, tests: str) -> tuple[bool, float]:
    """Run ``tests`` against the package in ``src``; (passed, seconds)."""
    env = {**os.environ, "PYTHONPATH": str(src), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *split(tests)]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return result.returncode == 0, time.perf_counter() - start


def split(tests: str) -> list[str]:
    """``"a.py b.py -k expr"`` -> ``["a.py", "b.py", "-k", "expr"]`` (the -k expression may hold spaces)."""
    head, _, expr = tests.partition(" -k ")
    return head.split() + (["-k", expr] if expr else [])


def apply(mutant: Mutant, src: Path) -> None:
    path = src / "bitsmith" / mutant.file
    text = path.read_text()
    count = text.count(mutant.find)
    if count != 1:
        raise SystemExit(f"mutant {mutant.method}/{mutant.name}: {mutant.find!r} occurs {count} times in {mutant.file}")
    path.write_text(text.replace(mutant.find, mutant.replace))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the mutants of this method only")
    parser.add_argument("--match", help="run the mutants whose description contains this text only")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "mutants.md")
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if args.only in (None, m.method) and (args.match or "") in m.name]
    for mutant in mutants:  # every mutation must apply before anything runs
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(ROOT / "src", Path(tmp) / "src")
            apply(mutant, Path(tmp) / "src")
    baseline = {}
    for tests in dict.fromkeys(m.tests for m in mutants):
        passed, _ = run_tests(ROOT / "src", tests)
        if not passed:
            raise SystemExit(f"the unmutated code fails `pytest {tests}`: fix that first")
        baseline[tests] = passed
    rows = []
    for mutant in mutants:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "src"
            shutil.copytree(ROOT / "src", src)
            apply(mutant, src)
            passed, seconds = run_tests(src, mutant.tests)
        rows.append((mutant, not passed, seconds))
        print(
            f"{'killed  ' if not passed else 'SURVIVED'} {mutant.method:12} {mutant.name} ({seconds:.0f} s)", flush=True
        )
    write(rows, args.out, full=args.only is None and args.match is None)
    survivors = [m for m, killed, _ in rows if not killed]
    print(f"{len(rows) - len(survivors)} killed, {len(survivors)} survived")
    sys.exit(1 if survivors else 0)


HEADER = "| method | mutation | file | tests | result | s |"


def page_rows(text: str) -> dict[tuple[str, str], tuple[str, str]]:
    """``{(method, mutation): (result, seconds)}`` of a mutants page."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[4] in ("killed", "**survived**"):
            out[(cells[0], cells[1])] = (cells[4], cells[5])
    return out


def write(rows: list[tuple[Mutant, bool, float]], out: Path, full: bool) -> None:
    """The page lists every mutant of ``MUTANTS`` in order: this run's results, and for a partial run
    (``--only``) the earlier results of the others (a mutant never run shows as *not run*)."""
    earlier = page_rows(out.read_text()) if out.is_file() and not full else {}
    fresh = {(m.method, m.name): ("killed" if k else "**survived**", f"{s:.0f}") for m, k, s in rows}
    results = {
        key: fresh.get(key) or earlier.get(key) or ("not run", "") for key in ((m.method, m.name) for m in MUTANTS)
    }
    killed = sum(result == "killed" for result, _ in results.values())
    lines = [
        "# Mutants: does the suite notice a broken method?",
        "",
        "Each row changes one line of a method's central mechanism in a copy of `src/` and runs that method's",
        "tests (`tests/mutants.py` holds the list; regenerate with `make mutants`, or the rows of one method with",
        "`python tests/mutants.py --only METHOD`). *killed*: a test failed.",
        "",
        f"**{killed} of {len(MUTANTS)} killed.**",
        "",
        HEADER,
        "|---|---|---|---|---|---|",
    ]
    for m in MUTANTS:
        result, seconds = results[(m.method, m.name)]
        lines.append(f"| {m.method} | {m.name} | `{m.file}` | `{m.tests}` | {result} | {seconds} |")
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
