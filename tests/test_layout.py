"""The import rules of the layout: each actor module wraps its stage alone, and the daemon and
training sides share only the package root."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder, forbidden", [("actors", "mmfuse.actors"), ("daemon", "mmfuse.training"),
                                               ("training", "mmfuse.daemon"), ("mmfuse", "mmfuse.daemon"),
                                               ("mmfuse", "mmfuse.training"), ("mmfuse", "mmfuse.actors")])
def test_modules_do_not_import_across_the_layout(folder, forbidden):
    offending = {path.name: sorted(n for n in imported(path) if n == forbidden or n.startswith(forbidden + "."))
                 for path in sorted((ROOT / folder).glob("*.py"))}
    assert not {name: found for name, found in offending.items() if found}


@pytest.mark.parametrize("module", ["mmfuse.daemon.main", "mmfuse.daemon.replay", "mmfuse.daemon.record",
                                    "mmfuse.daemon.keys", "mmfuse.commands", "mmfuse.training.train",
                                    "mmfuse.training.evaluate", "mmfuse.bundle", "mmfuse.actors.aligner",
                                    "mmfuse.actors.publisher", "mmfuse.actors.sensor", "mmfuse.daemon.tap",
                                    "mmfuse.daemon.monitor", "mmfuse.daemon.web"])
def test_commands_and_the_actors_that_run_no_model_import_without_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


def test_the_names_the_command_lines_offer_are_those_of_the_registries():
    from mmfuse import options
    from mmfuse.diffusion import BLOCKS, SAMPLERS
    from mmfuse.models import FUSION_HEADS
    from mmfuse.restorers import RESTORERS
    from mmfuse.training.distill import DistillWeights

    assert options.RESTORERS == tuple(RESTORERS) and options.FUSION_HEADS == tuple(FUSION_HEADS)
    assert options.CONDITIONINGS == tuple(BLOCKS) and options.SAMPLERS == SAMPLERS
    assert DistillWeights() == DistillWeights(**options.DISTILL_DEFAULTS)
