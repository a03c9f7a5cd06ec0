"""`medtune ablate`: a tiny quantization x adaptation grid trains, measures and writes its table."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import TINY_LABELS, TINY_NOTES
from medtune import ablate as ablate_mod
from medtune.ablate import ablate, quantization_unavailable
from medtune.config import Config
from medtune.errors import ConfigError, MedtuneError


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ablate_data")
    labels = [TINY_LABELS[i % 4] for i in range(len(TINY_NOTES))]
    pd.DataFrame({"text": TINY_NOTES, "label": labels}).to_csv(d / "train.csv", index=False)
    pd.DataFrame({"text": TINY_NOTES[:8], "label": labels[:8]}).to_csv(d / "test.csv",
                                                                         index=False)
    return d


def _cfg() -> Config:
    cfg = Config()
    cfg.train.batch_size = 8
    cfg.train.warmup_steps = 1
    cfg.train.eval_samples = 4
    cfg.train.log_every = 1
    cfg.lora.r = 8
    return cfg


def test_tiny_grid_writes_table_and_records_skips(data_dir, tiny_base, tmp_path, monkeypatch):
    real = quantization_unavailable
    monkeypatch.setattr(ablate_mod, "quantization_unavailable",
                        lambda q, device: "no 8-bit kernel here (test)" if q == "8bit"
                        else real(q, device))
    out = tmp_path / "ablation"
    rows = ablate(str(data_dir / "train.csv"), str(out), base=str(tiny_base), steps=2,
                  quantizations=("nf4", "8bit", "none"), adaptations=("lora", "full"),
                  cfg=_cfg(), progress=False)
    cells = {r["cell"]: r for r in rows}
    assert list(cells) == ["nf4 / lora", "nf4 / full", "8bit / lora", "8bit / full",
                           "none / lora", "none / full"]
    ok = [c for c, r in cells.items() if r["status"] == "ok"]
    assert ok == ["nf4 / lora", "none / lora", "none / full"]
    assert cells["nf4 / full"]["status"].startswith("skipped: full fine-tuning needs unquant")
    assert cells["8bit / lora"]["status"] == "skipped: no 8-bit kernel here (test)"
    assert cells["8bit / full"]["status"].startswith("skipped: full fine-tuning")
    for c in ok:
        r = cells[c]
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["macro_f1"] <= 1
        assert r["train_seconds"] > 0 and r["peak_memory_mb"] > 50 and r["size_mb"] > 0
        assert r["latency_p50_ms"] > 0
    # QLoRA cell: 4-bit layers in memory; full fine-tuning: fp32 everywhere
    assert 4.1 < cells["nf4 / lora"]["quantized_bits_per_param"] < 4.2
    assert cells["none / full"]["bits_per_param"] == pytest.approx(32.0)
    assert cells["none / full"]["quantized_bits_per_param"] is None

    saved = json.loads((out / "ablation.json").read_text())
    assert saved["settings"]["steps"] == 2 and len(saved["cells"]) == 6
    assert saved["settings"]["full_lr"] == pytest.approx(Config().train.lr * 0.1)
    md = (out / "ablation.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 7 and "no 8-bit kernel here" in md  # header + one line per cell
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "nf4 / lora" in page
    assert (out / "ablation_accuracy.png").is_file()
    assert not (out / "cells" / "none-lora" / "checkpoints").exists()
    assert (out / "cells" / "none-full" / "model.safetensors").is_file()


def test_quantization_probe_on_this_machine():
    assert quantization_unavailable("none", "cpu") is None
    # bitsandbytes >= 0.50 runs NF4 on CPU (ARCHITECTURE.md); a failure must come as a reason
    assert quantization_unavailable("nf4", "cpu") is None
    reason = quantization_unavailable("8bit", "cuda:99")
    assert reason is not None and "8bit" in reason


def test_bad_grid_and_missing_test_fail_fast(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="unknown"):
        ablate(str(data_dir / "train.csv"), str(tmp_path / "a"), quantizations=("int3",))
    with pytest.raises(ConfigError, match="steps"):
        ablate(str(data_dir / "train.csv"), str(tmp_path / "a"), steps=0)
    lone = tmp_path / "lone.csv"
    lone.write_text((data_dir / "train.csv").read_text())
    with pytest.raises(MedtuneError, match="no --test file"):
        ablate(str(lone), str(tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_failed_cell_is_recorded_and_leaves_no_run(data_dir, tiny_base, tmp_path, monkeypatch):
    import medtune.train

    def broken(cfg, data, output, **kwargs):
        (output / "half").mkdir(parents=True)  # a crash after writing something
        raise MedtuneError("loss became nan at step 1")

    monkeypatch.setattr(medtune.train, "train", broken)
    out = tmp_path / "ablation"
    rows = ablate(str(data_dir / "train.csv"), str(out), base=str(tiny_base), steps=1,
                  quantizations=("none",), adaptations=("lora",), cfg=_cfg(), progress=False)
    assert [r["status"] for r in rows] == ["failed: loss became nan at step 1"]
    assert not (out / "cells" / "none-lora").exists()
    assert "failed: loss became nan" in (out / "ablation.md").read_text()
    assert not (out / "ablation_accuracy.png").exists()  # nothing measured, nothing plotted


def test_ctrl_c_keeps_the_cells_measured_so_far(data_dir, tiny_base, tmp_path, monkeypatch,
                                                capsys):
    calls = []

    def cell(cfg, data, val, cell_dir, base, labels_file, texts, gold, q, a, progress):
        calls.append(a)
        if a == "full":
            cell_dir.mkdir(parents=True)
            raise KeyboardInterrupt
        return {"status": "ok", "accuracy": 0.5, "train_seconds": 1.0}

    monkeypatch.setattr(ablate_mod, "_run_cell", cell)
    out = tmp_path / "ablation"
    with pytest.raises(KeyboardInterrupt):
        ablate(str(data_dir / "train.csv"), str(out), base=str(tiny_base), steps=1,
               quantizations=("none", "nf4"), adaptations=("lora", "full"), cfg=_cfg())
    assert calls == ["lora", "full"]  # nothing after the interrupted cell
    cells = json.loads((out / "ablation.json").read_text())["cells"]
    assert [c["status"] for c in cells] == ["ok", "not run: interrupted",
                                            "not run: interrupted", "not run: interrupted"]
    assert cells[0]["accuracy"] == 0.5 and not (out / "cells" / "none-full").exists()
    assert "not run: interrupted" in (out / "ablation.md").read_text()
    err = capsys.readouterr().err
    assert "ablate: cell 1/4 none / lora: accuracy 0.5, trained in 1.0 s" in err
    assert f"ablate: interrupted; 1 measured cell(s) written to {out}" in err
