"""model.text_dim against the width of the T5 encoder named in data.text_encoder."""

import subprocess
import sys

import pytest

from ecdit_dist.config import ConfigError
from ecdit_dist.data.text import build_text_encoder
from test_data_pipeline import tiny_t5        # a 32-wide T5 encoder built locally


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    return tiny_t5(tmp_path_factory.mktemp("t5") / "t5")


def test_matching_width_loads_and_encodes(t5):
    enc = build_text_encoder(str(t5), 32, 20)
    emb, mask = enc.encode(["two red circles at the top left"])
    assert enc.dim == 32 and emb.shape == (1, 20, 32) and mask.shape == (1, 20)
    assert build_text_encoder(str(t5), None, 20).dim == 32     # None: the encoder's own width


def test_wrong_width_names_both_values_and_the_fix(t5):
    with pytest.raises(ConfigError, match=r"width 32 .*model.text_dim is 8192; set model.text_dim=32"):
        build_text_encoder(str(t5), 8192, 20)


def test_width_is_checked_before_the_weights_load(t5, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in t5.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="model.text_dim is 64"):
        build_text_encoder(str(broken), 64, 20)
    with pytest.raises(Exception) as err:                        # the right width reaches the broken weights
        build_text_encoder(str(broken), 32, 20)
    assert not isinstance(err.value, ConfigError)


def test_data_encode_cli_checks_the_width(t5, tmp_path):
    out = subprocess.run([sys.executable, "-m", "ecdit_dist.cli", "data", "encode", str(tmp_path), "--encoder", str(t5),
                          "--text-len", "20", "--text-dim", "64"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "model.text_dim is 64; set model.text_dim=32" in out.stderr, out.stderr
