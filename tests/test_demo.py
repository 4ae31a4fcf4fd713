"""`mergelab demo --headless` on the bundled family, with a reduced budget: the table's numbers
are real evaluations (the searched merge's row equals `mergelab eval` of the exported model)."""
from __future__ import annotations

import json

from mergelab.cli import main
from mergelab.cli.demo_cmd import family


def test_demo_headless_table_is_real(tmp_path, capsys):
    out = tmp_path / "demo.json"
    run = tmp_path / "runs" / "demo-test"
    rc = main(["demo", "--headless", "--trials", "2", "--layer-groups", "2", "--val-limit", "6",
               "--limit", "8", "--run", str(run), "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "searched merge" in printed and "ties, equal weights" in printed
    table = json.loads(out.read_text())
    rows = dict((name, r) for name, r in table["rows"])
    _, fts, _, test = family()
    assert set(rows) == {"base", "ties, equal weights", "searched merge", *(p.name for p in fts)}
    best = run / "best" / "model"
    assert (best / "model.safetensors").is_file() and (best / "mergelab_recipe.yaml").is_file()
    assert main(["eval", str(best), "--eval", str(test), "--limit", "8", "--json", str(tmp_path / "e.json"),
                 "--device", "cpu"]) == 0
    again = json.loads((tmp_path / "e.json").read_text())
    assert again["metrics"] == rows["searched merge"]["metrics"]
    assert again["combined"] == rows["searched merge"]["combined"]
    # the printed row shows those numbers
    line = next(l for l in printed.splitlines() if l.startswith("searched merge"))
    assert line.split()[-1] == f"{again['combined']:.3f}"
    # and the search scored 2 trials on the validation split
    trials = [json.loads(l) for l in (run / "trials.jsonl").read_text().splitlines()]
    assert len([t for t in trials if t["state"] == "COMPLETE"]) == 2
