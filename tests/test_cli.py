"""The `indexcache` command: runs the embedded tiny config end to end; bad input exits 2 with a message."""

from conftest import REPO
from indexcache_jax.cli import main


def test_generate_runs_on_the_tiny_config(capsys):
    code = main(["generate", "--config", str(REPO / "configs/tiny.yaml"), "--batch", "2", "--prompt-len", "16",
                 "--new-tokens", "3"])
    out = capsys.readouterr().out
    assert code == 0
    assert "IndexCache pattern: FSSSFSSS (retention 0.250)" in out
    assert "prefill B=2 T=16" in out and "ms/step" in out and "row 0 continuation" in out


def test_bad_config_and_pattern_exit_with_a_clear_message(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "configs/tiny.yaml").read_text().replace("index_topk: 32", "index_topk: 0"))
    assert main(["generate", "--config", str(bad)]) == 2
    assert "model.index_topk: must be > 0, got 0" in capsys.readouterr().err
    assert main(["generate", "--config", str(REPO / "configs/tiny.yaml"), "--pattern", "FSS"]) == 2
    assert "has 3 letters but the model has 8 layers" in capsys.readouterr().err
    assert main(["generate", "--config", str(REPO / "configs/tiny.yaml"), "--batch", "0"]) == 2
