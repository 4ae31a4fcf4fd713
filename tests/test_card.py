"""The model card: Hub-readable front matter, sources, license agreement, search provenance and chart.

Metadata is parsed back with huggingface_hub's own ModelCard / metadata_load.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard, metadata_load

from mergelab.card import (
    hub_id,
    method_paper,
    read_provenance,
    recipe_sources,
    render_model_card,
    score_chart,
    sources_info_from_local,
    write_model_card,
)
from mergelab.errors import MergelabError

RECIPE = {
    "merge_method": "ties",
    "base_model": "acme/base-1b",
    "models": [
        {"model": "acme/math-1b", "parameters": {"weight": 0.6, "density": 0.5}},
        {"model": "acme/code-1b@v2", "parameters": {"weight": 0.4}},
    ],
    "parameters": {"normalize": True},
    "dtype": "bfloat16",
}
MIT_ALL = {r: {"license": "mit"} for r in ("acme/base-1b", "acme/math-1b", "acme/code-1b@v2")}


def meta_of(text: str) -> dict:
    return ModelCard(text).data.to_dict()


def test_front_matter_parses_with_huggingface_hub(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # without the `plots` extra: text only
    path = write_model_card(tmp_path, RECIPE, sources_info=MIT_ALL)
    assert path == tmp_path / "README.md"
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]  # no temp file left behind
    text = path.read_text()
    assert text == render_model_card(tmp_path, RECIPE, sources_info=MIT_ALL)
    expected = {
        "base_model": ["acme/base-1b", "acme/math-1b", "acme/code-1b"],
        "base_model_relation": "merge",
        "license": "mit",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["merge", "mergelab", "ties"],
    }
    assert metadata_load(path) == expected
    assert meta_of(text) == expected
    assert "All source models are licensed mit; so is this merge." in text


def test_body_says_what_was_merged_and_how(tmp_path):
    text = render_model_card(tmp_path / "my-merge", RECIPE, sources_info=MIT_ALL)
    assert "# my-merge\n" in text
    title, url = method_paper("ties")  # the operators registry's reference when it has one
    assert url == "https://arxiv.org/abs/2306.01708" and "2306.01708" in title
    assert (
        "This model is a merge of 3 models made with mergelab using the **ties** method "
        f"([{title}](https://arxiv.org/abs/2306.01708))." in text
    )
    assert "- [acme/base-1b](https://huggingface.co/acme/base-1b) — base model\n" in text
    assert "- [acme/math-1b](https://huggingface.co/acme/math-1b) (weight=0.6, density=0.5)\n" in text
    assert "- [acme/code-1b](https://huggingface.co/acme/code-1b) (weight=0.4)\n" in text
    recipe_block = "```yaml\n" + yaml.safe_dump(RECIPE, sort_keys=False).rstrip() + "\n```"
    assert recipe_block in text
    assert "## Search" not in text


def test_hub_ids_versus_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme" / "local-ft").mkdir(parents=True)  # looks like an id but exists locally
    assert hub_id("acme/local-ft") is None
    assert hub_id("acme/remote-ft") == "acme/remote-ft"
    assert hub_id("acme/remote-ft@main") == "acme/remote-ft"
    assert hub_id("/models/abs") is None
    assert hub_id("./models/rel") is None
    assert hub_id("justaname") is None
    assert hub_id("a/../b") is None
    recipe = {
        "merge_method": "linear",
        "models": [{"model": "acme/local-ft"}, {"model": "acme/remote-ft"}, {"model": "/models/abs"}],
    }
    assert recipe_sources(recipe) == ["acme/local-ft", "acme/remote-ft", "/models/abs"]
    text = render_model_card(tmp_path, recipe)
    assert meta_of(text)["base_model"] == ["acme/remote-ft"]
    assert "- `acme/local-ft` (local path)\n" in text
    assert "- `/models/abs` (local path)\n" in text
    assert "Local paths are listed here only" in text


def test_no_hub_sources_means_no_base_model(tmp_path):
    recipe = {"merge_method": "slerp", "base_model": "/m/a", "models": [{"model": "/m/a"}, {"model": "/m/b"}],
              "parameters": {"t": 0.5}}
    meta = meta_of(render_model_card(tmp_path, recipe))
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert meta["tags"] == ["merge", "mergelab", "slerp"]


def test_license_disagreement_and_unknown(tmp_path):
    differ = dict(MIT_ALL, **{"acme/math-1b": {"license": "apache-2.0"}})
    text = render_model_card(tmp_path, RECIPE, sources_info=differ)
    assert "license" not in meta_of(text)
    assert (
        "the source models' licenses differ (`acme/base-1b`: mit, `acme/math-1b`: apache-2.0, "
        "`acme/code-1b@v2`: mit)" in text
    )
    partial = {"acme/base-1b": {"license": "mit"}}
    text = render_model_card(tmp_path, RECIPE, sources_info=partial)
    assert "license" not in meta_of(text)
    assert "it is unknown for `acme/math-1b`, `acme/code-1b@v2`." in text
    text = render_model_card(tmp_path, RECIPE)
    assert "license" not in meta_of(text)
    assert "it is unknown for `acme/base-1b`, `acme/math-1b`, `acme/code-1b@v2`." in text


def test_searched_merge_section(tmp_path):
    search = {
        "optimizer": "cmaes",
        "n_trials": 5,
        "eval_spec": {"kind": "perplexity", "data": "wiki.txt", "max_tokens": 4096},
        "best_trial": 3,
        "best_metrics": {"ppl": 7.5, "acc": 0.61234},
        "source_metrics": {"acme/math-1b": {"ppl": 8.0, "acc": 0.5}, "./b": {"ppl": 9.25}},
        "history": [1, 2, 3, 4, 5],
        "run_name": "sweep-7",
    }
    text = render_model_card(tmp_path / "out", RECIPE, search, MIT_ALL)
    assert "# sweep-7\n" in text
    assert "searched with **cmaes** over **5** trials" in text
    assert "(https://arxiv.org/abs/2403.13187)" in text  # CMA-ES: evolutionary merging paper
    assert "The best trial is trial 3." in text
    assert "```yaml\nkind: perplexity\ndata: wiki.txt\nmax_tokens: 4096\n```" in text
    table = (
        "| model | ppl | acc |\n"
        "|---|---:|---:|\n"
        "| **this merge** (trial 3) | 7.5 | 0.6123 |\n"
        "| `acme/math-1b` | 8 | 0.5 |\n"
        "| `./b` | 9.25 | – |\n"
    )
    assert table in text
    chart = score_chart([1, 2, 3, 4, 5])
    assert "```text\n" + chart + "\n```" in text
    assert "Best combined score after each trial: 1 after trial 0, 5 after trial 4." in text
    meta = meta_of(text)  # the body never breaks the front matter
    assert meta["tags"] == ["merge", "mergelab", "ties"]


def test_score_chart_hand_computed():
    # lo=1, hi=5, 2 lines = 16 eighths: heights 1+round((v-1)/4*15) = 1, 5, 9, 12, 16
    assert score_chart([1, 2, 3, 4, 5], height=2) == (
        "5 ┤  ▁▄█\n"
        "1 ┤▁▅███\n"
        "  └─────\n"
        "  trial 0 trial 4"
    )
    # 10 trials on 5 columns: each column shows the running best at its last trial (1,3,5,7,9)
    assert score_chart(list(range(10)), width=5, height=1).splitlines()[0] == "9 ┤▁▃▅▆█"
    # trials before any success are blank; a flat series fills the columns
    assert score_chart([None, 2.0, 4.0], height=1).splitlines()[0] == "4 ┤ ▁█"
    assert score_chart([3.0, 3.0], height=1).splitlines()[0] == "3 ┤██"
    assert score_chart([]) == ""
    assert score_chart([None, float("nan")]) == ""


def test_token_never_appears(tmp_path, monkeypatch):
    secret = "hf_SECRETsecretSECRET123"
    monkeypatch.setenv("HF_TOKEN", secret)
    recipe = dict(RECIPE, hf_token=secret)
    search = {"optimizer": "tpe", "n_trials": 1, "history": [1.0],
              "eval_spec": {"api_key": secret, "data": "x", "max_tokens": 64, "tokenizer": "t"}}
    text = render_model_card(tmp_path, recipe, search)
    assert secret not in text
    assert text.count("<redacted>") == 2
    assert "max_tokens: 64\ntokenizer: t\n" in text  # look-alike keys are kept


def test_method_paper_from_operator_registry(tmp_path, monkeypatch):
    from operators.base import REGISTRY, OperatorSpec

    spec = OperatorSpec(name="toy_op", fn=lambda x: x, params=(), summary="toy",
                        paper="Toy merging (arXiv 2401.00001)")
    monkeypatch.setitem(REGISTRY, "toy_op", spec)
    text = render_model_card(tmp_path, {"merge_method": "toy_op", "models": [{"model": "a/b"}]})
    assert "using the **toy_op** method ([Toy merging (arXiv 2401.00001)](https://arxiv.org/abs/2401.00001))." in text
    # Without a registry entry, the card's own table of known methods gives the paper.
    monkeypatch.delitem(REGISTRY, "ties", raising=False)
    assert method_paper("ties") == ("TIES-Merging (Yadav et al., 2023)", "https://arxiv.org/abs/2306.01708")
    monkeypatch.delitem(REGISTRY, "passthrough", raising=False)
    text = render_model_card(tmp_path, {"merge_method": "passthrough", "models": [{"model": "a/b"}]})
    assert "This model is a merge of 1 model made with mergelab using the **passthrough** method." in text


def test_sources_info_from_local(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a\n")
    (b / "config.json").write_text(json.dumps({"license": "mit"}))
    recipe = {"merge_method": "linear", "models": [{"model": str(a)}, {"model": str(b)},
                                                   {"model": "nobody/not-cached-xyz"}]}
    assert sources_info_from_local(recipe) == {str(a): {"license": "apache-2.0"}, str(b): {"license": "mit"}}


def test_read_provenance(tmp_path):
    assert read_provenance(tmp_path) == (None, None)
    (tmp_path / "mergelab_recipe.yaml").write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    (tmp_path / "mergelab_search.json").write_text(json.dumps({"optimizer": "tpe"}))
    assert read_provenance(tmp_path) == (RECIPE, {"optimizer": "tpe"})
    (tmp_path / "mergelab_recipe.yaml").write_text("merge_method: ties\nmodels:\n  - model: [a\n")
    with pytest.raises(MergelabError, match=r"mergelab_recipe\.yaml line 4: the recipe is not valid YAML"):
        read_provenance(tmp_path)
    (tmp_path / "mergelab_recipe.yaml").write_text("- just\n- a list\n")
    with pytest.raises(MergelabError, match=r"expected a mapping .* got list"):
        read_provenance(tmp_path)
    (tmp_path / "mergelab_recipe.yaml").write_text("merge_method: ties\n")
    (tmp_path / "mergelab_search.json").write_text("{not json")
    with pytest.raises(MergelabError, match=r"mergelab_search\.json: not valid JSON"):
        read_provenance(tmp_path)


def test_card_marks_a_fusion_hybrids_metrics(tmp_path):
    from mergelab.card import render_model_card

    card = render_model_card(tmp_path, {"merge_method": "ties", "base_model": "acme/base",
                                        "models": [{"model": "acme/ft", "parameters": {"weight": 1.0}}]},
                             search={"optimizer": "cmaes", "n_trials": 3, "best_trial": 1,
                                     "fusion": {"members": ["merge", "sources"], "weighting": "opt", "tau": 0.5},
                                     "best_metrics": {"combined": 1.5}, "history": [1.0, 1.5]})
    line = next(l for l in card.splitlines() if "hybrid" in l)
    assert "weighting `opt`" in line and "τ = 0.5" in line and "fusion_recipe.yaml" in line
    plain = render_model_card(tmp_path, {"merge_method": "ties", "base_model": "acme/base",
                                         "models": [{"model": "acme/ft", "parameters": {"weight": 1.0}}]},
                              search={"optimizer": "cmaes", "n_trials": 3, "best_trial": 1,
                                      "best_metrics": {"combined": 1.5}, "history": [1.0, 1.5]})
    assert "hybrid" not in plain


# ---------------------------------------------------------------------------- ModelCardData, pictures
def test_front_matter_is_what_model_card_data_writes(tmp_path):
    from huggingface_hub import ModelCardData

    text = render_model_card(tmp_path, RECIPE, sources_info=MIT_ALL)
    front = text.split("---\n")[1]
    assert front == ModelCardData(
        base_model=["acme/base-1b", "acme/math-1b", "acme/code-1b"], base_model_relation="merge",
        license="mit", library_name="transformers", pipeline_tag="text-generation",
        tags=["merge", "mergelab", "ties"]).to_yaml() + "\n"
    # no license agreed, no Hub source: those keys are absent rather than null
    local = render_model_card(tmp_path, {"merge_method": "linear", "models": [{"model": str(tmp_path)}]})
    assert meta_of(local) == {"library_name": "transformers", "pipeline_tag": "text-generation",
                              "tags": ["merge", "mergelab", "linear"]}


def test_recipe_rows_spread_gradients_and_filters():
    from mergelab.card_plots import recipe_rows

    rows = recipe_rows({
        "merge_method": "ties", "parameters": {"lambda": 1.5, "normalize": True},
        "models": [
            {"model": "/x/ft_a", "parameters": {"weight": [0.0, 1.0], "density": 0.5}},
            {"model": "org/ft_b@v1", "parameters": {"weight": [{"filter": "self_attn", "value": [0, 0.3, 0.6]},
                                                               {"value": 2}]}},
        ]})
    assert [(r.label, r.values) for r in rows] == [
        ("all · lambda", [1.5, 1.5, 1.5]),  # a bool (normalize) is not a number to colour
        ("ft_a · weight", [0.0, 0.5, 1.0]),
        ("ft_a · density", [0.5, 0.5, 0.5]),
        ("ft_b · weight · self_attn", [0.0, 0.3, 0.6]),
        ("ft_b · weight · other", [2.0, 2.0, 2.0]),
    ]


SEARCHED = {"optimizer": "cmaes", "n_trials": 3, "best_trial": 2, "history": [None, 0.5, 0.7],
            "scores": [None, 0.5, 0.7], "run_name": "pics"}


def test_without_matplotlib_the_card_is_text_only(tmp_path, monkeypatch):
    from mergelab.card import model_card_files

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    files = model_card_files(tmp_path, RECIPE, SEARCHED, MIT_ALL)
    assert list(files) == ["README.md"]
    assert "![" not in files["README.md"] and "trial 0 trial 2" in files["README.md"]


def test_with_matplotlib_the_card_shows_two_pictures(tmp_path):
    pytest.importorskip("matplotlib", reason="the optional `plots` extra (pip install mergelab[plots])")
    from mergelab.card import model_card_files

    files = model_card_files(tmp_path, RECIPE, SEARCHED, MIT_ALL)
    assert sorted(files) == ["README.md", "mergelab_recipe.png", "mergelab_scores.png"]
    card = files["README.md"]
    assert "![The recipe's parameters per model and layer group](mergelab_recipe.png)" in card
    assert "![Score of each trial and the best so far](mergelab_scores.png)" in card
    assert card.index("mergelab_recipe.png") < card.index("## Search") < card.index("mergelab_scores.png")
    for name in ("mergelab_recipe.png", "mergelab_scores.png"):
        assert files[name][:8] == b"\x89PNG\r\n\x1a\n" and len(files[name]) > 2000
    # a merge writes them beside the weights, and push uploads them with the card
    write_model_card(tmp_path, RECIPE, SEARCHED, MIT_ALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "mergelab_recipe.png", "mergelab_scores.png"]


# ---------------------------------------------------------------------------- the score plot's points
SCORED = [  # counted trials as search_metadata lists them: 3 was interrupted (not counted), 2 failed, 5 pruned
    {"number": 0, "value": 0.2, "state": "COMPLETE"},
    {"number": 1, "value": 0.1, "state": "COMPLETE"},
    {"number": 2, "value": None, "state": "FAIL"},
    {"number": 4, "value": 0.6, "state": "COMPLETE"},
    {"number": 5, "value": 0.05, "state": "PRUNED"},
    {"number": 6, "value": 0.4, "state": "COMPLETE"},
]


def test_score_plot_has_a_point_per_scored_trial_and_the_best_line_at_trial_numbers():
    pytest.importorskip("matplotlib", reason="the optional `plots` extra (pip install mergelab[plots])")
    from mergelab.card_plots import scores_figure

    fig = scores_figure([0.2, 0.2, 0.2, 0.6, 0.6, 0.6], SCORED)
    (ax,) = fig.axes
    (points,) = ax.collections
    assert points.get_offsets().tolist() == [[0, 0.2], [1, 0.1], [4, 0.6], [6, 0.4]]  # completed trials only
    (line,) = ax.lines
    assert list(line.get_xdata()) == [0, 1, 2, 4, 5, 6] and list(line.get_ydata()) == [0.2, 0.2, 0.2, 0.6, 0.6, 0.6]
    # a plain list of numbers (None: no score) is read as trials 0, 1, 2, ...
    (points,) = scores_figure([None, 0.5, 0.7], [None, 0.5, 0.7]).axes[0].collections
    assert points.get_offsets().tolist() == [[1, 0.5], [2, 0.7]]
    # no score at all: no picture
    assert scores_figure([None, None], [{"number": 0, "value": None, "state": "FAIL"}] * 2) is None


def test_card_images_plot_the_scores_search_metadata_reads_from_trials_jsonl(tmp_path, monkeypatch):
    """search_metadata lists every counted trial's score from trials.jsonl; the card's plot gets
    them (one point per completed trial), and mergelab_search.json keeps them."""
    import shutil

    import mergelab.card_plots as plots
    from search.export import search_metadata
    from search.rundir import RunDir

    run = tmp_path / "ties-search"
    shutil.copytree(Path(__file__).parent / "fixtures" / "tui" / "ties-search", run)
    with (run / "trials.jsonl").open("a") as f:  # a trial whose process died is no point and no step
        f.write(json.dumps({"number": 30, "state": "FAIL", "value": None, "interrupted": True}) + "\n")
    meta = search_metadata(RunDir(run))
    records = [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()]
    counted = [r for r in records if not r.get("interrupted")]
    assert meta["scores"] == [{"number": r["number"], "value": r["value"], "state": r["state"]}
                              for r in sorted(counted, key=lambda r: r["number"])]
    assert len(meta["scores"]) == len(meta["history"]) == 30
    complete = [r for r in counted if r["state"] == "COMPLETE"]
    assert 0 < len(complete) < 30  # the fixture has a failed trial: it gets no point
    pytest.importorskip("matplotlib", reason="the optional `plots` extra (pip install mergelab[plots])")
    drawn = []
    real = plots.scores_figure
    monkeypatch.setattr(plots, "scores_figure", lambda h, s=None: drawn.append(real(h, s)) or drawn[-1])
    images = plots.card_images({"merge_method": "ties", "models": []}, meta)
    assert plots.IMAGE_FILES["scores"] in images
    (fig,) = drawn
    assert len(fig.axes[0].collections[0].get_offsets()) == len(complete)


def test_without_matplotlib_a_card_with_trial_scores_is_text_only(tmp_path, monkeypatch):
    from mergelab.card import model_card_files

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    search = {**SEARCHED, "history": [0.2, 0.2, 0.2, 0.6, 0.6, 0.6], "scores": SCORED}
    files = model_card_files(tmp_path, RECIPE, search, MIT_ALL)
    assert list(files) == ["README.md"]
    card = files["README.md"]
    assert "![" not in card and "### Best score over trials" in card
    assert "```text\n" + score_chart(search["history"]) + "\n```" in card
