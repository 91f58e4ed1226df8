"""The names the command lines offer (restorers, fusion heads, conditionings, samplers) and the
self-distillation defaults, importable without torch so that `--help` and argument errors answer at once.
The registries they name live beside the models; a test keeps the two the same."""

RESTORERS = ("zero", "mean", "dropout", "autoencoder", "retrieval", "diffusion")
FUSION_HEADS = ("mlp", "umca")
CONDITIONINGS = ("gating", "adaln", "concat", "none")
SAMPLERS = ("ddim", "admc")
DISTILL_DEFAULTS = {"mkd": 0.1, "rs": 0.13, "rnc": 0.5, "temperature": 2.0}  # the paper's code's weights
