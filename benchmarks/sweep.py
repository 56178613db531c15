"""The loop behind the one-shot sweeps (kshare.py, objective.py, output_dtype.py, o_refit.py): one
care-convert option varied, each cell converted and evaluated with oneshot.py's calibration, test text
and stats caches.

A sweep gives its own settings, the cells of each model (row key -> convert keyword arguments) and
how a row is recorded; this module does the rest: the originals' perplexity, --resume, saving the
JSON/markdown after every row.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import common
import oneshot


def add_eval_calib_args(p) -> None:
    """Test-text and calibration arguments with oneshot.py's defaults (so results are comparable)."""
    p.add_argument("--eval-tokens", default="smollm2-135m=2048,4096", help="as in oneshot.py")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--eval-batch", type=int, default=4)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--calib-chars", type=int, default=512_000)
    p.add_argument("--seed", type=int, default=0)


def add_common_args(p, out_stem: str) -> None:
    """Arguments every sweep shares with oneshot.py (same defaults, so their cells are comparable)."""
    p.add_argument("--data-dir", default=None, help="DATA_DIR of scripts/get_data.sh (default data/)")
    p.add_argument("--policies", default="uniform,adjusted")
    add_eval_calib_args(p)
    p.add_argument("--work-dir", default=None, help="checkpoints + stats caches (default DATA/bench/oneshot, "
                                                     "shared with oneshot.py)")
    p.add_argument("--out", default=str(common.RESULTS / out_stem), help="output path stem (.json/.md)")
    p.add_argument("--resume", action="store_true", help="keep rows of an existing OUT.json with the same settings")


def add_pair_args(p, out_stem: str) -> None:
    """Arguments of the two-way sweeps (objective.py, output_dtype.py): models, KV ratios, the rest."""
    p.add_argument("--models", default=oneshot.DEFAULT_MODELS)
    p.add_argument("--ratios", default="0.5,0.25")
    add_common_args(p, out_stem)


def md_header(res: dict, title: str, conversion: str, cells: str) -> list[str]:
    """The first lines of a sweep's markdown: title, command, machine, what every conversion shares."""
    s = res["settings"]
    return [*common.report_head(res, title),
            f"- every conversion: {conversion}, calibration {s['calib_samples']} x {s['calib_seqlen']} tokens "
            f"(train split, as oneshot.py), perplexity on the test split ({s['eval_seqlen']}-token windows), "
            "fp32, no healing", f"- cells: {cells}", ""]


@dataclass
class Setup:
    """What every sweep starts from (see start())."""
    data: Path
    work: Path
    eval_tokens: dict
    calib: list[Path]
    ppl_fn: Callable
    res: dict
    save: Callable[[], None]


def start(args, own_settings: dict, render_md: Callable[[dict], str]) -> Setup:
    """The data and work folders, eval token counts, calibration files and perplexity function of a sweep,
    and its results dict (rows kept from OUT.json with --resume when the settings are the same) with the
    saver that writes OUT.json/.md."""
    data = common.data_dir(args.data_dir)
    work = Path(args.work_dir) if args.work_dir else data / "bench" / "oneshot"
    ppl_fn, ppl_name = common.perplexity_fn()
    settings = {**own_settings, "eval_seqlen": args.eval_seqlen, "eval_batch": args.eval_batch,
                "calib_seqlen": args.calib_seqlen, "calib_chars_per_file": args.calib_chars, "seed": args.seed,
                "perplexity": ppl_name}
    res = {"command": common.command_line(), "started": common.now_utc(), "machine": common.machine(),
           "settings": settings, "models": {}, "rows": {}}
    out_json = Path(args.out + ".json")
    if args.resume and out_json.is_file():
        old = json.loads(out_json.read_text())
        if old.get("settings") == settings:
            res["rows"], res["models"] = old["rows"], old["models"]
    return Setup(data, work, oneshot.parse_eval_tokens(args.eval_tokens), common.calib_subset(data, args.calib_chars),
                 ppl_fn, res, common.report_saver(res, args.out, render_md))


def run(args, own_settings: dict, models: list[str], cells: Callable[[str], Iterable[tuple[str, dict, dict]]],
        render_md: Callable[[dict], str], ckpt_name: str, extra: Callable[[dict], dict] | None = None) -> int:
    """cells(model) -> (row key, row fields naming the cell, care-convert kwargs) triples. Each row stores
    the model, those fields, ppl, tokens, per-layer ranks, the cache size and `extra(care_report)`."""
    st = start(args, {**own_settings, "calib_samples": args.calib_samples}, render_md)
    data, work, eval_tokens, calib, ppl_fn, res, save = (st.data, st.work, st.eval_tokens, st.calib, st.ppl_fn,
                                                         st.res, st.save)
    for name in models:
        src, tok, texts, n_tok, per_file, mdir, stats_cache = oneshot.model_inputs(name, data, work, eval_tokens,
                                                                                   args)
        minfo = res["models"].setdefault(name, {"path": str(src), "eval_tokens": n_tok})
        if "original_ppl" not in minfo:
            minfo["original_ppl"] = oneshot.original_ppl(src, tok, texts, per_file, args, ppl_fn)
            save()
        for key, fields, kw in cells(name):
            if key in res["rows"]:
                continue
            rep, r = oneshot.convert_and_evaluate(src, mdir / ckpt_name, calib, tok, texts, per_file, stats_cache,
                                                  args, ppl_fn, method="care", **kw)
            res["rows"][key] = {"model": name, **fields, "ppl": r["ppl"], "tokens": r["tokens"],
                                "k_ranks": [l["k_rank"] for l in rep["layers"]],
                                "v_ranks": [l["v_rank"] for l in rep["layers"]],
                                "cache_values_per_token": rep["cache_values_per_token"],
                                **(extra(rep) if extra else {})}
            print(f"{key}: ppl {r['ppl']:.3f}", flush=True)
            save()
    save()
    print(Path(args.out + ".md").read_text())
    return 0


def pair_cells(name: str, field: str, values, policies: list[str], ratios: list[float],
               option: Callable = lambda value: value, **convert_kw):
    """Cells of a sweep over one care-convert option (objective.py, output_dtype.py, kshare.py): model x policy x
    ratio x `field` in `values`, keyed "model|policy|ratio|value"; the option is `option(value)` (e.g. "default"
    -> None); `convert_kw` are the care-convert options all share."""
    for policy in policies:
        for ratio in ratios:
            for value in values:
                yield (f"{name}|{policy}|{ratio}|{value}", {"policy": policy, "kv_ratio": ratio, field: value},
                       {"ranks": policy, "kv_ratio": ratio, field: option(value), **convert_kw})


def run_pair(args, field: str, values: tuple, render_md: Callable[[dict], str], ckpt_name: str,
             shared: dict | None = None, extra: Callable[[dict], dict] | None = None) -> int:
    """main() of a two-way sweep (add_pair_args' arguments): every model x policy x ratio converted with
    each of `values` for care-convert option `field`; `shared` are the care-convert options all cells
    share (recorded in the settings too)."""
    shared = shared or {}
    policies, ratios = common.csv_list(args.policies), [float(r) for r in common.csv_list(args.ratios)]

    def cells(name):
        return pair_cells(name, field, values, policies, ratios, **shared)

    return run(args, {"ratios": ratios, "policies": policies, **shared}, common.csv_list(args.models), cells,
               render_md, ckpt_name, extra)


def table_rows(res: dict, values) -> Iterable[tuple[list[str], float, list[dict | None]]]:
    """Per model x policy x ratio of a sweep's results: (the row's first cells: model (original ppl),
    policy, ratio; the original's perplexity; the rows of `values` in order, None where missing)."""
    s = res["settings"]
    for model, minfo in res["models"].items():
        orig = minfo.get("original_ppl")
        for policy in s["policies"]:
            for ratio in s["ratios"]:
                got = [res["rows"].get(f"{model}|{policy}|{ratio}|{v}") for v in values]
                yield [f"{model} ({orig:.2f})", policy, str(ratio)], orig, got


def bold_best_rows(res: dict, values, cell: Callable[[object, dict, float], str]) -> list[list[str]]:
    """table_rows as markdown rows: each value's cell rendered by `cell(value, row, original ppl)`, "—" where
    not run, and the lowest perplexity of each row in bold."""
    rows = []
    for head, orig, got in table_rows(res, values):
        best = min((r["ppl"] for r in got if r), default=None)
        cells = []
        for v, r in zip(values, got):
            txt = "—" if r is None else cell(v, r, orig)
            cells.append(f"**{txt}**" if r is not None and r["ppl"] == best else txt)
        rows.append(head + cells)
    return rows


def pair_table(res: dict, values: tuple, labels: list[str], change_digits: int = 1) -> str:
    """Markdown table of a two-way sweep: one row per model x policy x ratio, the perplexity for both
    `values` (column headings `labels`) and the relative change of the second vs the first."""
    rows = []
    for head, orig, got in table_rows(res, values):
        cells = ["—" if r is None else f"{r['ppl']:.2f} (x{r['ppl'] / orig:.2f})" for r in got]
        change = "—" if None in got else f"{100 * (got[1]['ppl'] / got[0]['ppl'] - 1):+.{change_digits}f} %"
        rows.append(head + cells + [change])
    return common.md_table(["model (original ppl)", "ranks", "KV ratio", *labels, "change"], rows)
