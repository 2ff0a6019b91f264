import subprocess
import sys


def test_import_is_lean():
    code = (
        "import sys, torch, vmoba_compile\n"
        "bad = [m for m in ('diffusers', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
