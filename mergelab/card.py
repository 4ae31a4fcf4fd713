"""The model card (README.md) of a merged model: Hub metadata plus how the model was made.

Written next to the weights by `merge` / `export` and uploaded by `push`; never contains a token.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from .errors import MergelabError

RECIPE_FILE = "mergelab_recipe.yaml"
SEARCH_FILE = "mergelab_search.json"
CARD_FILE = "README.md"

# Used when the operators registry does not know the method (or gives no paper).
_KNOWN_PAPERS: dict[str, tuple[str, str]] = {
    "linear": ("Model soups (Wortsman et al., 2022)", "https://arxiv.org/abs/2203.05482"),
    "task_arithmetic": (
        "Editing Models with Task Arithmetic (Ilharco et al., 2022)",
        "https://arxiv.org/abs/2212.04089",
    ),
    "ties": ("TIES-Merging (Yadav et al., 2023)", "https://arxiv.org/abs/2306.01708"),
    "dare_ties": (
        "Language Models are Super Mario: DARE (Yu et al., 2023)",
        "https://arxiv.org/abs/2311.03099",
    ),
    "dare_linear": (
        "Language Models are Super Mario: DARE (Yu et al., 2023)",
        "https://arxiv.org/abs/2311.03099",
    ),
    "breadcrumbs": ("Model Breadcrumbs (Davari & Belilovsky, 2023)", "https://arxiv.org/abs/2312.06795"),
    "breadcrumbs_ties": (
        "Model Breadcrumbs (Davari & Belilovsky, 2023)",
        "https://arxiv.org/abs/2312.06795",
    ),
    "della": ("DELLA-Merging (Deep et al., 2024)", "https://arxiv.org/abs/2406.11617"),
    "della_linear": ("DELLA-Merging (Deep et al., 2024)", "https://arxiv.org/abs/2406.11617"),
    "model_stock": ("Model Stock (Jang et al., 2024)", "https://arxiv.org/abs/2403.19522"),
    "slerp": (
        "Animating rotation with quaternion curves (Shoemake, 1985)",
        "https://doi.org/10.1145/325165.325242",
    ),
}
_EVOLUTIONARY_PAPER = (
    "Evolutionary Optimization of Model Merging Recipes (Akiba et al., 2024)",
    "https://arxiv.org/abs/2403.13187",
)

# Hub ids: "owner/name", optionally "@revision" (mergekit's model reference syntax).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")
# Keys whose values never belong in a public card, wherever they appear in the recipe/eval spec.
# ("max_tokens" or "tokenizer" are not secrets; "hf_token", "api_key", "db_password" are.)
_SECRET_KEY = re.compile(r"(secret|password|passwd|(^|[_-])(token|api[_-]?key|authorization)$)", re.I)

_SPARK = "▁▂▃▄▅▆▇█"


# ---------------------------------------------------------------------------- sources
def model_ref(entry: Any) -> str | None:
    """The model reference string of a recipe entry (a string, or {model: ...})."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict):
        m = entry.get("model")
        if isinstance(m, str):
            return m
        if isinstance(m, dict) and isinstance(m.get("model"), str):
            return m["model"]
    return None


def recipe_sources(recipe: dict) -> list[str]:
    """Every model the recipe reads, base first, in recipe order, without duplicates."""
    refs: list[str] = []
    if isinstance(recipe.get("base_model"), str):
        refs.append(recipe["base_model"])
    for entry in recipe.get("models") or []:
        if (r := model_ref(entry)) is not None:
            refs.append(r)
    for sl in recipe.get("slices") or []:
        for src in (sl or {}).get("sources") or []:
            if (r := model_ref(src)) is not None:
                refs.append(r)
    seen: dict[str, None] = {}
    for r in refs:
        seen.setdefault(r, None)
    return list(seen)


def hub_id(ref: str) -> str | None:
    """The Hub repo id of a model reference, or None when it is a local path.

    "owner/name" (with an optional "@revision" or "+lora" suffix) that is not an existing
    local path is a Hub id; anything else (absolute, ./relative, existing dirs) is local.
    """
    if Path(ref).expanduser().exists():
        return None
    base = ref.split("+", 1)[0].split("@", 1)[0]
    if _HUB_ID.match(base) and ".." not in base:
        return base
    return None


def sources_info_from_local(recipe: dict) -> dict[str, dict]:
    """Licenses of the sources that can be read without the network.

    Local sources: their README.md front matter (or config.json "license"). Hub ids: the
    README.md in the local huggingface_hub cache, when it was downloaded before.
    """
    info: dict[str, dict] = {}
    for ref in recipe_sources(recipe):
        lic = None
        rid = hub_id(ref)
        if rid is None:
            d = Path(ref).expanduser()
            lic = _license_from_card(d / CARD_FILE) or _license_from_config(d / "config.json")
        else:
            try:
                from huggingface_hub import try_to_load_from_cache

                cached = try_to_load_from_cache(rid, CARD_FILE)
            except Exception:  # a broken cache never stops a card from being written
                cached = None
            if isinstance(cached, str):
                lic = _license_from_card(Path(cached))
        if lic:
            info[ref] = {"license": lic}
    return info


def _license_from_card(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        from huggingface_hub import metadata_load

        meta = metadata_load(path) or {}
    except Exception:
        return None
    lic = meta.get("license")
    return lic if isinstance(lic, str) and lic else None


def _license_from_config(path: Path) -> str | None:
    try:
        lic = json.loads(path.read_text()).get("license")
    except (OSError, ValueError, AttributeError):
        return None
    return lic if isinstance(lic, str) and lic else None


def _agreed_license(sources: list[str], sources_info: dict | None) -> tuple[str | None, str]:
    """(license or None, a note for the body explaining the choice)."""
    info = sources_info or {}
    licenses = {ref: (info.get(ref) or {}).get("license") for ref in sources}
    unknown = [ref for ref, lic in licenses.items() if not lic]
    if not sources:
        return None, "The license is not set: the recipe names no source model."
    if unknown:
        return None, (
            "The license is not set in the metadata: it is unknown for "
            + ", ".join(f"`{r}`" for r in unknown)
            + ". Check the source models' licenses and add `license:` to the front matter."
        )
    distinct = sorted({str(v) for v in licenses.values()})
    if len(distinct) > 1:
        return None, (
            "The license is not set in the metadata: the source models' licenses differ ("
            + ", ".join(f"`{r}`: {lic}" for r, lic in licenses.items())
            + "). Choose one compatible with all of them."
        )
    return distinct[0], f"All source models are licensed {distinct[0]}; so is this merge."


# ---------------------------------------------------------------------------- method
def method_paper(method: str) -> tuple[str, str | None] | None:
    """(title, url or None) of the paper behind a merge method, None when there is none known."""
    paper = None
    try:
        from operators import get_operator

        paper = get_operator(method).paper or None
    except Exception:  # registry not importable / method unknown: fall back to the table
        paper = None
    if paper:
        if re.match(r"^https?://", paper):
            return paper, paper
        m = re.search(r"(?:arXiv[: ]*)?(\d{4}\.\d{4,5})(v\d+)?", paper)
        if m:
            return paper, f"https://arxiv.org/abs/{m.group(1)}"
        return paper, None
    return _KNOWN_PAPERS.get(method)


def _link(title: str, url: str | None) -> str:
    return f"[{title}]({url})" if url else title


# ---------------------------------------------------------------------------- chart
def score_chart(history: list[float | None], *, width: int = 60, height: int = 4) -> str:
    """A filled text chart of the best score after each trial, `height` lines tall.

    Columns cover consecutive trials (the value at the end of each column's range, since the
    series is a running best); each line holds 8 levels, so the chart resolves height*8 steps.
    Lines are prefixed by the value they reach; the last line names the trial range, numbered
    from 0 like trials everywhere else in mergelab (Optuna, the run directory, the dashboard).
    """
    n = len(history)
    if n == 0:
        return ""
    cols = min(width, n)
    values: list[float | None] = []
    for j in range(cols):
        end = ((j + 1) * n) // cols  # bucket [j*n//cols, end)
        v = history[end - 1]
        values.append(None if v is None or not math.isfinite(float(v)) else float(v))
    finite = [v for v in values if v is not None]
    if not finite:
        return ""
    lo, hi = min(finite), max(finite)
    steps = height * 8
    heights = []
    for v in values:
        if v is None:
            heights.append(0)
        elif hi == lo:
            heights.append(steps)
        else:  # lowest value still shows one eighth, highest fills the column
            heights.append(1 + round((v - lo) / (hi - lo) * (steps - 1)))
    label_w = max(len(_fmt(hi)), len(_fmt(lo)))
    lines = []
    for row in range(height - 1, -1, -1):  # top line first
        cells = []
        for h in heights:
            fill = h - row * 8
            cells.append(" " if fill <= 0 else _SPARK[min(fill, 8) - 1])
        label = _fmt(hi) if row == height - 1 else (_fmt(lo) if row == 0 else "")
        lines.append(f"{label:>{label_w}} ┤{''.join(cells).rstrip()}")
    left, right = "trial 0", f"trial {n - 1}"
    axis = " " * label_w + " └" + "─" * cols
    gap = max(1, cols + 2 - len(left) - len(right))
    lines.append(axis)
    lines.append(" " * (label_w + 1) + left + " " * gap + right)
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "–" if v is None else str(v)
    if isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        return f"{v:.4g}"
    return str(v)


# ---------------------------------------------------------------------------- rendering
def _redact(obj: Any) -> Any:
    """A copy with the values of secret-looking keys replaced (recipes are user-written)."""
    if isinstance(obj, dict):
        return {
            k: ("<redacted>" if isinstance(k, str) and _SECRET_KEY.search(k) else _redact(v))
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [_redact(v) for v in obj]
    return obj


def _yaml_block(obj: Any) -> str:
    return "```yaml\n" + yaml.safe_dump(obj, sort_keys=False, allow_unicode=True).rstrip() + "\n```"


def _source_line(ref: str, hub_ids: dict[str, str | None]) -> str:
    rid = hub_ids[ref]
    return f"[{rid}](https://huggingface.co/{rid})" if rid else f"`{ref}` (local path)"


def _params_text(params: Any) -> str:
    if not isinstance(params, dict) or not params:
        return ""
    return ", ".join(f"{k}={_compact(v)}" for k, v in params.items())


def _compact(v: Any) -> str:
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"))
    return _fmt(v)


def _metrics_table(search: dict, key: str = "best_metrics") -> str | None:
    best = search.get(key) or {}
    src = search.get("source_metrics") or {}
    metrics: list[str] = list(best)
    for m in src.values():
        for k in m or {}:
            if k not in metrics:
                metrics.append(k)
    if not metrics:
        return None
    trial = search.get("best_trial")
    first = "**this merge**" + (f" (trial {trial})" if trial is not None else "")
    rows = [[first] + [_fmt(best.get(k)) for k in metrics]]
    for ref, vals in src.items():
        rows.append([f"`{ref}`"] + [_fmt((vals or {}).get(k)) for k in metrics])
    head = "| model | " + " | ".join(metrics) + " |"
    sep = "|---|" + "---:|" * len(metrics)
    return "\n".join([head, sep] + ["| " + " | ".join(r) + " |" for r in rows])


def render_model_card(
    model_dir: Path,
    recipe: dict,
    search: dict | None = None,
    sources_info: dict | None = None,
    images: dict[str, str] | None = None,
) -> str:
    """The README.md text: YAML front matter for the Hub (huggingface_hub's ModelCardData), then
    how the model was made. `images` (kind -> file name, from `card_images`) are shown where
    they help a Hub visitor: the recipe's heat map under Recipe, the score plot under Search."""
    images = images or {}
    model_dir = Path(model_dir)
    recipe = _redact(recipe)
    search = _redact(search) if search else None
    method = str(recipe.get("merge_method") or "unknown")
    sources = recipe_sources(recipe)
    hub_ids = {ref: hub_id(ref) for ref in sources}
    base_models = list(dict.fromkeys(r for r in hub_ids.values() if r))
    license_, license_note = _agreed_license(sources, sources_info)

    from huggingface_hub import ModelCardData

    data = ModelCardData(
        base_model=base_models or None,
        base_model_relation="merge" if base_models else None,
        license=license_,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["merge", "mergelab"] + ([method] if method not in ("merge", "mergelab") else []),
    )
    name = (search or {}).get("run_name") or model_dir.name or "merged model"
    out: list[str] = ["---", data.to_yaml(), "---", "", f"# {name}", ""]

    paper = method_paper(method)
    how = f"the **{method}** method"
    if paper:
        how += f" ({_link(*paper)})"
    searched = " The recipe was found by a search, described below." if search else ""
    out.append(
        f"This model is a merge of {len(sources)} model{'s' if len(sources) != 1 else ''} "
        f"made with mergelab using {how}.{searched}"
    )
    out += ["", "## Sources", ""]
    base = recipe.get("base_model")
    models_params = {model_ref(e): (e.get("parameters") if isinstance(e, dict) else None)
                     for e in recipe.get("models") or []}
    for ref in sources:
        role = " — base model" if ref == base else ""
        p = _params_text(models_params.get(ref))
        out.append(f"- {_source_line(ref, hub_ids)}{role}" + (f" ({p})" if p else ""))
    local = [r for r in sources if hub_ids[r] is None]
    if local:
        out += ["", "Local paths are listed here only; `base_model` in the metadata names the "
                "sources that are Hub repositories."]
    out += ["", f"**License.** {license_note}", "", "## Recipe", "",
            f"Saved as `{RECIPE_FILE}` next to the weights; `mergelab merge {RECIPE_FILE} OUT` "
            "rebuilds this model from the same sources.", ""]
    if "recipe" in images:
        out += [f"![The recipe's parameters per model and layer group]({images['recipe']})", ""]
    out += [_yaml_block(recipe)]

    if search:
        out += ["", "## Search", ""]
        opt = search.get("optimizer", "unknown")
        n_trials = search.get("n_trials")
        out.append(
            f"The recipe's parameters were searched with **{opt}** over "
            f"**{n_trials if n_trials is not None else 'an unknown number of'}** trials; "
            "each trial merged the models in memory and scored them with the eval below."
        )
        if re.search(r"cma|evol", str(opt), re.I):
            out += ["", f"Evolutionary search of merge recipes follows {_link(*_EVOLUTIONARY_PAPER)}."]
        if search.get("best_trial") is not None:
            out += ["", f"The best trial is trial {search['best_trial']}."]
        if search.get("fusion"):
            fu = search["fusion"]
            out += ["", "**The metrics below are of a hybrid, not of these weights alone:** the best "
                    f"trial fused this merge at inference time with {', '.join(map(str, fu.get('members', [])))} "
                    f"(logit fusion, weighting `{fu.get('weighting')}`, τ = {fu.get('tau')}); "
                    "`fusion_recipe.yaml` beside the weights reproduces it with `mergelab eval`."]
        if search.get("eval_spec"):
            out += ["", "### Evaluation", "", _yaml_block(search["eval_spec"])]
        if search.get("test_metrics"):
            fit = (search.get("best_metrics") or {}).get("combined")
            out += ["", "### Held-out metrics", "",
                    "Scored on the held-out eval below, whose items no trial of the search scored: "
                    "these are the numbers to quote. The best trial next to each source model"
                    + (f"; its fitness on the search's own eval was {_fmt(fit)}." if fit is not None else "."),
                    "", _metrics_table(search, "test_metrics")]
            if search.get("test_eval_spec"):
                out += ["", _yaml_block(search["test_eval_spec"])]
        else:
            table = _metrics_table(search)
            if table:
                out += ["", "### Metrics", "",
                        "The best trial next to each source model, on the search's own eval: the "
                        "search picked this trial for these scores, so they flatter it; no held-out "
                        "eval (`test_eval`) was set.", "", table]
        history = [h for h in (search.get("history") or [])]
        chart = score_chart(history)
        if "scores" in images:
            out += ["", f"![Score of each trial and the best so far]({images['scores']})"]
        if chart:
            first = next((h for h in history if h is not None), None)
            out += [
                "",
                "### Best score over trials",
                "",
                f"Best combined score after each trial: {_fmt(first)} after trial 0, "
                f"{_fmt(history[-1])} after trial {len(history) - 1}.",
                "",
                "```text",
                chart,
                "```",
            ]
    return "\n".join(out).rstrip() + "\n"


def model_card_files(
    model_dir: Path,
    recipe: dict,
    search: dict | None = None,
    sources_info: dict | None = None,
) -> dict[str, str | bytes]:
    """README.md and the pictures it shows (when matplotlib is installed), by file name."""
    from .card_plots import IMAGE_FILES, card_images

    images = card_images(_redact(recipe), _redact(search) if search else None)
    shown = {kind: name for kind, name in IMAGE_FILES.items() if name in images}
    return {CARD_FILE: render_model_card(model_dir, recipe, search, sources_info, images=shown), **images}


def write_model_card(
    model_dir: Path,
    recipe: dict,
    search: dict | None = None,
    sources_info: dict | None = None,
) -> Path:
    """Render the card (and its pictures) into MODEL_DIR, each file atomically. Returns the card's path."""
    model_dir = Path(model_dir)
    files = model_card_files(model_dir, recipe, search, sources_info)
    for name, content in files.items():
        tmp = model_dir / f".{name}.tmp-{os.getpid()}"
        tmp.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        os.replace(tmp, model_dir / name)
    return model_dir / CARD_FILE


def read_provenance(model_dir: Path) -> tuple[dict | None, dict | None]:
    """(recipe, search) read from a merged model directory; None for a file that is absent."""
    model_dir = Path(model_dir)
    recipe = search = None
    rp = model_dir / RECIPE_FILE
    if rp.is_file():
        try:
            recipe = yaml.safe_load(rp.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise MergelabError(
                f"{rp}{where}: the recipe is not valid YAML ({getattr(e, 'problem', e)}). "
                "Fix the file, or re-export the model to write it again."
            ) from None
        if not isinstance(recipe, dict):
            raise MergelabError(
                f"{rp}: expected a mapping (merge_method, models, ...), got "
                f"{type(recipe).__name__}. Re-export the model to write it again."
            )
    sp = model_dir / SEARCH_FILE
    if sp.is_file():
        try:
            search = json.loads(sp.read_text(encoding="utf-8"))
        except ValueError as e:
            raise MergelabError(
                f"{sp}: not valid JSON ({e}). Fix or delete the file (it only feeds the model card)."
            ) from None
        if not isinstance(search, dict):
            raise MergelabError(f"{sp}: expected a JSON object, got {type(search).__name__}.")
    return recipe, search
