import os, pathlib
pathlib.Path(os.environ.get("BITSMITH_HOSTILE_MARKER", "/tmp/bitsmith-hostile-marker")).write_text("ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    model_type = "evilllama"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
