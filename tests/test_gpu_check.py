"""bench/gpu_check.py, the script a GPU session runs, in its CPU smoke mode: every section runs and is reported."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_check  # noqa: E402


def test_gpu_check_smoke_runs_every_section_and_writes_json_and_markdown(tmp_path):
    results = gpu_check.main(["--smoke", "--out", str(tmp_path), "--repeats", "1", "--sections",
                              "head,train,sampling"])
    for name in ("head", "train", "sampling"):
        assert "error" not in results[name], results[name]
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(saved["train"]) == {f"d16/{o}" for o in gpu_check.OBJECTIVES} | {"d30/mclr/ckpt"}
    assert all(r["plan_peak_GiB"] > 0 for r in saved["train"].values())
    # the float32 reference and the bf16 paths agree to bf16 precision
    assert all(max(r["max_err"].values()) < 0.2 for r in saved["head"].values())
    assert "| d30/mclr/ckpt |" in (tmp_path / "gpu_check.md").read_text()
