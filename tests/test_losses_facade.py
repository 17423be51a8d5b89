"""`prefalign.losses` is a torch-only package: every loss resolves, and importing it loads no heavy library."""

import subprocess
import sys

import prefalign.losses as losses


def test_every_exported_loss_resolves_to_a_function():
    for name in losses.__all__:
        fn = getattr(losses, name)
        assert callable(fn) and fn.__name__ == name and fn.__doc__


def test_importing_losses_loads_only_torch():
    code = (
        "import sys, prefalign.losses; "
        "print(sorted(m for m in ('transformers', 'diffusers', 'accelerate', 'peft', 'datasets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
