"""Privacy attacks, the measurement of the privacy methods: what released features or shared gradients reveal.

``adversaries``: an attribute-inference classifier and a reconstruction decoder trained on released features.
``inversion``: gradient inversion of federated updates, DLG (Zhu et al. 2019) and the cosine gradient-similarity
attack (Geiping et al. 2020), with reconstruction scores matched to the originals.
"""

from bitsmith.privacy.adversaries import attribute_inference, reconstruction_attack
from bitsmith.privacy.inversion import dlg, gradient_similarity, gradients_of, infer_label, matched_scores

__all__ = ["attribute_inference", "dlg", "gradient_similarity", "gradients_of", "infer_label", "matched_scores",
           "reconstruction_attack"]  # fmt: skip
