"""Documentation that is generated or executed stays true."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_is_up_to_date():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "config_doc.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_readme_quickstart_is_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    blocks = {}
    for marker in ("quickstart:main", "quickstart:test"):
        after = readme.split(f"<!-- {marker} -->", 1)[1]
        body = after.split("```bash", 1)[1].split("```", 1)[0].strip()
        assert len(body.splitlines()) == 1, body
        blocks[marker] = body
    assert "ecdit train --config configs/tiny-cpu.yaml" in blocks["quickstart:main"]
    assert blocks["quickstart:test"].endswith("pytest")
    assert "torch==2.13.0" in blocks["quickstart:test"]
    assert "quickstart:test" in (ROOT / ".ci" / "run").read_text()
