"""The names the command lines offer (restorers, fusion heads, conditionings, samplers), the
self-distillation defaults and the number types of their options, importable without torch so that `--help`
and argument errors answer at once. The registries they name live beside the models; a test keeps the two the
same."""

import argparse
import math

RESTORERS = ("zero", "mean", "dropout", "autoencoder", "retrieval", "diffusion")
FUSION_HEADS = ("mlp", "umca")
CONDITIONINGS = ("gating", "adaln", "concat", "none")
SAMPLERS = ("ddim", "admc")
DISTILL_DEFAULTS = {"mkd": 0.1, "rs": 0.13, "rnc": 0.5, "temperature": 2.0}  # the paper's code's weights


def _number(kind, test, wanted: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{wanted}, got {text!r}") from None
        if not (math.isfinite(value) and test(value)):
            raise argparse.ArgumentTypeError(f"{wanted}, got {text}")
        return value
    return parse


positive_int = _number(int, lambda v: v > 0, "a whole number of at least 1")
count = _number(int, lambda v: v >= 0, "a whole number of at least 0")
positive = _number(float, lambda v: v > 0, "a finite number above 0")
weight = _number(float, lambda v: v >= 0, "a finite number of at least 0")
share = _number(float, lambda v: 0 < v < 1, "a share between 0 and 1 (both left out)")
proportion = _number(float, lambda v: 0 < v <= 1, "a share above 0 and at most 1")
