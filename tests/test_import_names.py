"""Our import names must not collide with packages our dependencies probe for.

transformers imports a package importable as `kernels` when it finds one, so the card's
`kernels/` folder is a namespace directory imported as `ttvq_kernels`."""
import subprocess
import sys

from conftest import ROOT

PROBE = (
    "import transformers, torch, sys\n"
    "from transformers.utils import import_utils as iu\n"
    "from transformers import LlamaConfig, LlamaForCausalLM\n"
    "torch.manual_seed(0)\n"
    "m = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,"
    " num_key_value_heads=1, vocab_size=50))\n"
    "out = m(torch.arange(10)[None]).logits\n"
    "print(iu.is_kernels_available(), round(float(out.sum()), 4))\n"
)


def run_probe(cwd):
    p = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout.strip().splitlines()[-1]


def test_transformers_same_inside_and_outside_the_checkout(tmp_path):
    inside = run_probe(ROOT)  # the checkout (with its kernels/ folder) first on sys.path
    outside = run_probe(tmp_path)
    assert inside == outside
    assert inside.split()[0] == "False" or "kernels" not in inside


def test_our_packages_import_under_safe_names():
    import ttvq_analysis  # noqa: F401
    import ttvq_kernels  # noqa: F401
    import ttvq_methods.registry  # noqa: F401

    for top in ("ttvq_kernels", "ttvq_methods", "ttvq_analysis"):
        assert sys.modules[top].__name__ == top
