"""care-heal on a tiny converted Llama (CPU, a few optimizer steps each):

* the healing loss (CE + beta*tau^2*KD to the original) goes down, both along the run and on a
  fixed batch re-evaluated with the converted vs the healed weights;
* OUT keeps the converted layout: config.json verbatim (same k_ranks/v_ranks/rope dim, so the same
  KV cache width per token), same tensor names/shapes/dtypes, tied embeddings still tied; it loads
  in model_defs and its KV cache holds exactly r_K + r_V + d_r values per token per layer;
* `--train attention` leaves every non-attention tensor bit-identical;
* kv_b_proj's zero blocks (keys reading c_V, values reading c_K) are trained by default, and vLLM
  serves the result with the joint latent; with `--kv-blocks keep` they stay exactly zero, so
  vLLM's CPU backend still decodes the healed layers with the key/value split;
* a run stopped at a checkpoint and resumed equals the uninterrupted run, bit for bit, and so does one
  ended by Ctrl-C, SIGTERM or SIGHUP anywhere in its training loop (it saves its last finished update);
* bad input exits 2 with one line and leaves neither OUT nor OUT.partial behind.
"""
from __future__ import annotations

import argparse
import errno
import json
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import model_defs  # noqa: F401  (registers care_mla with the Auto classes)

from converter import heal as heal_mod
from converter import heal_cli
from converter.file_modes import current_umask
from converter.heal_data import pack_windows
from converter.heal_options import parse_tokens
from converter.heal_state import checkpoint_bytes
from converter.pipeline import convert
from tests.cli_run import ROOT, assert_refused_by, run_main_alone
from tests.tiny_models import damaged_copy, make_tiny_original


HELD = ("A quiet letter arrived at the station before noon. The clerk read it twice, folded it, and "
        "walked to the harbour where the ships were loading grain for the winter. ") * 6

TEXT = " ".join(
    f"The {a} {n} of the {b} garden {v} every morning, and the {n}s near river {i} {v} too."
    for i, (a, n, b, v) in enumerate(
        [("small", "bird", "old", "sings"), ("green", "tree", "quiet", "grows"),
         ("red", "fox", "north", "runs"), ("tall", "house", "east", "stands"),
         ("blue", "boat", "west", "floats"), ("young", "cat", "south", "sleeps")] * 12))

STEPS = 8
SEQLEN, BATCH, ACCUM = 32, 2, 2
TOKENS = STEPS * SEQLEN * BATCH * ACCUM


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one intra-op thread is several times faster than two on a shared CI box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("heal")
    orig = make_tiny_original(root / "orig", "llama", num_layers=2)
    calib = root / "calib.txt"
    calib.write_text(TEXT)
    conv = root / "conv"
    convert(orig, conv, calib_files=[calib], method="care", ranks="adjusted", kv_ratio=0.5,
            calib_samples=8, calib_seqlen=64, seed=0)
    train = root / "train.txt"
    train.write_text(TEXT)
    held = root / "held.jsonl"
    held.write_text("\n".join(json.dumps({"text": HELD[i:]}) for i in (0, 40)) + "\n")
    return root, orig, conv, train, held


def heal_args(tiny, out, *extra):
    root, orig, conv, train, held = tiny
    return [str(conv), str(out), "--teacher", str(orig), "--text", str(train), "--tokens", str(TOKENS),
            "--seqlen", str(SEQLEN), "--batch-size", str(BATCH), "--grad-accum", str(ACCUM),
            "--lr", "2e-3", "--warmup-ratio", "0", "--eval-text", str(held), "--eval-every", "4",
            "--eval-tokens", "128", "--no-progress", *map(str, extra)]


@pytest.fixture(scope="module")
def healed(tiny):
    """The uninterrupted reference run (train all)."""
    out = tiny[0] / "healed"
    assert heal_cli.main(heal_args(tiny, out, "--eval-teacher")) == 0
    return out


@pytest.fixture(scope="module")
def healed_blocks_kept(tiny):
    """The same run with `--kv-blocks keep`: kv_b_proj's zero blocks stay zero."""
    out = tiny[0] / "healed_blocks_kept"
    assert heal_cli.main(heal_args(tiny, out, "--kv-blocks", "keep")) == 0
    return out


def _kv_b_blocks(folder: Path, layer: int, k_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the blocks a converted kv_b_proj fills, those it leaves zero) of one layer: keys read c_K
    (latent columns < k_rank), values read c_V."""
    cfg = json.loads((folder / "config.json").read_text())
    kv_b = load_file(folder / "model.safetensors")[f"model.layers.{layer}.self_attn.kv_b_proj.weight"]
    kv_b = kv_b.view(cfg["num_attention_heads"], 2, -1, kv_b.shape[-1])     # [head, (k_nope, v), d_h, latent]
    return (torch.cat([kv_b[:, 0, :, :k_rank].flatten(), kv_b[:, 1, :, k_rank:].flatten()]),
            torch.cat([kv_b[:, 0, :, k_rank:].flatten(), kv_b[:, 1, :, :k_rank].flatten()]))


def test_kv_b_proj_zero_blocks_trained_by_default_kept_on_request(tiny, healed, healed_blocks_kept):
    _, _, conv, _, _ = tiny
    cfg = json.loads((conv / "config.json").read_text())
    for l, k in enumerate(cfg["k_ranks"]):
        conv_kept, conv_zero = _kv_b_blocks(conv, l, k)
        assert 0 < k < k + cfg["v_ranks"][l] and not conv_zero.any(), "converted kv_b_proj is block-diagonal"
        _, filled = _kv_b_blocks(healed, l, k)
        assert filled.any(), f"layer {l}: default healing left the zero blocks zero"
        kept, zero = _kv_b_blocks(healed_blocks_kept, l, k)
        assert not zero.any(), f"layer {l}: --kv-blocks keep filled kv_b_proj's zero blocks"
        assert not torch.equal(kept, conv_kept), f"layer {l}: kv_b_proj's blocks did not train"
    assert json.loads((healed / "heal_log.json").read_text())["kv_split_layers"] == 0
    assert json.loads((healed_blocks_kept / "heal_log.json").read_text())["kv_split_layers"] == len(cfg["k_ranks"])


def _load(path):
    import model_defs  # noqa: F401
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_loss_goes_down(tiny, healed):
    log = json.loads((healed / "heal_log.json").read_text())
    losses = [s["loss"] for s in log["steps"]]
    assert len(losses) == STEPS and log["tokens_seen"] == TOKENS
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    for s in log["steps"]:
        assert abs(s["loss"] - (s["ce"] + s["kd"])) < 1e-4 * max(1.0, s["loss"])   # beta = tau = 1
    # the same batch, converted vs healed weights, against the frozen original
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, orig, conv, train, _ = tiny
    tok = AutoTokenizer.from_pretrained(conv)
    x = pack_windows(tok, [TEXT], SEQLEN)[:4].long()
    teacher = AutoModelForCausalLM.from_pretrained(orig, dtype=torch.float32).eval()
    with torch.no_grad():
        t = teacher(input_ids=x).logits
        before = sum(heal_mod.heal_losses(_load(conv)(input_ids=x).logits, t, x, 1.0))
        after = sum(heal_mod.heal_losses(_load(healed)(input_ids=x).logits, t, x, 1.0))
    assert after < before, (before, after)
    # held-out perplexity measured at step 0 and at every eval step; the teacher's too
    assert [e["step"] for e in log["eval"]] == [0, 4, 8]
    assert log["eval"][-1]["ppl"] < log["eval"][0]["ppl"]
    assert log["teacher_ppl"] is not None and log["teacher_ppl"] > 0
    assert (healed / "heal_curve.png").stat().st_size > 1000


def test_output_keeps_converted_layout(tiny, healed):
    _, _, conv, _, _ = tiny
    assert (healed / "config.json").read_bytes() == (conv / "config.json").read_bytes()
    assert heal_mod.tensor_shapes(healed) == heal_mod.tensor_shapes(conv)
    assert "lm_head.weight" not in heal_mod.tensor_shapes(healed)      # still tied
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "care_report.json",
              "configuration_care.py", "modeling_care.py"):
        assert (healed / f).read_bytes() == (conv / f).read_bytes(), f
    # the model card: the conversion's, plus what healing did
    log = json.loads((healed / "heal_log.json").read_text())
    card = (healed / "README.md").read_text()
    assert card.startswith((conv / "README.md").read_text().rstrip("\n"))
    assert "## Healing" in card and f"on {log['tokens_seen']:,} tokens" in card
    assert f"{log['eval'][-1]['ppl']:.3f} at {log['eval'][-1]['tokens']:,}" in card
    assert not (healed.parent / "healed.partial").exists()
    assert not list(healed.parent.glob(".healed.tmp-*"))
    # modes as any new folder and file get from the umask (it was written in a 0700 mkdtemp folder, its weights
    # by safetensors, 0600: converter/file_modes.py)
    mask = current_umask()
    wrong = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in [healed, *healed.rglob("*")]
             if stat.S_IMODE(p.stat().st_mode) != (0o777 if p.is_dir() else 0o666) & ~mask}
    assert not wrong, wrong

    model = _load(healed)
    cfg = json.loads((conv / "config.json").read_text())
    assert model.config.model_type == "care_mla"
    assert type(model).__name__ == cfg["architectures"][0]
    assert list(model.config.k_ranks) == cfg["k_ranks"] and list(model.config.v_ranks) == cfg["v_ranks"]
    assert model.config.qk_rope_head_dim == cfg["qk_rope_head_dim"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # the KV cache it builds: per layer, latent r_K + r_V and rope key d_r values per token
    x = torch.tensor([[5, 17, 99, 3, 250, 7]])
    with torch.no_grad():
        cache = model(input_ids=x, use_cache=True).past_key_values
    for l, (k, v) in enumerate(zip(cfg["k_ranks"], cfg["v_ranks"])):
        c, k_pe = cache.layers[l].keys, cache.layers[l].values
        assert c.shape == (1, 1, x.shape[1], k + v), (l, c.shape)
        assert k_pe.shape == (1, 1, x.shape[1], cfg["qk_rope_head_dim"]), (l, k_pe.shape)
    # and it did change (the attention weights moved)
    a, b = load_file(conv / "model.safetensors"), load_file(healed / "model.safetensors")
    assert not torch.equal(a["model.layers.0.self_attn.kv_b_proj.weight"], b["model.layers.0.self_attn.kv_b_proj.weight"])


def test_how_the_latent_scale_is_split_does_not_change_healing(tiny, healed, tmp_path):
    """The converted checkpoint with its latent dimensions rescaled by 1e-3..1e3 (kv_a_proj's rows times d,
    kv_b_proj's columns divided by it: the same model, as care-convert wrote it for `--latent joint --objective
    attention` before its factors were balanced) heals to the same losses and weights: care-heal balances the
    factors first (balance_latents). Without it AdamW, which moves every entry by ~lr, trains another model."""
    _, _, conv, _, _ = tiny
    scaled = tmp_path / "conv_scaled"
    shutil.copytree(conv, scaled)
    model = _load(conv)
    g = torch.Generator().manual_seed(7)
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.scale_latent_(torch.exp(torch.empty(attn.rank, dtype=torch.float64).uniform_(-7, 7, generator=g)))
    model.save_pretrained(tmp_path / "weights")
    shutil.copy(tmp_path / "weights" / "model.safetensors", scaled / "model.safetensors")
    out = tmp_path / "healed"
    args = heal_args(tiny, out, "--eval-teacher")
    args[0] = str(scaled)
    assert heal_cli.main(args) == 0
    la, lb = (json.loads((p / "heal_log.json").read_text()) for p in (healed, out))
    for a, b in zip(la["steps"], lb["steps"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)
    a, b = load_file(healed / "model.safetensors"), load_file(out / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=k)


def test_a_one_update_run_trains(tiny, tmp_path, capsys):
    """The warmup's first step is at lr 0 (transformers' schedule). A run of one update with the default
    --warmup-ratio was all warmup: it trained nothing and still wrote OUT. The last update is never a warmup step.
    Also: --no-progress silences the evaluation's bars too (its 2 batches each drew one)."""
    out = tmp_path / "out"
    assert heal_cli.main(heal_args(tiny, out, "--tokens", SEQLEN * BATCH * ACCUM, "--warmup-ratio", "0.03")) == 0
    assert "it/s" not in capsys.readouterr().err
    log = json.loads((out / "heal_log.json").read_text())
    assert log["total_steps"] == 1 and log["warmup_steps"] == 0 and log["steps"][0]["lr"] == 2e-3, log["steps"]
    before, after = load_file(tiny[2] / "model.safetensors"), load_file(out / "model.safetensors")
    assert (after["model.embed_tokens.weight"] - before["model.embed_tokens.weight"]).abs().max() > 1e-4


def test_train_attention_only_touches_attention(tiny):
    _, _, conv, _, _ = tiny
    out = tiny[0] / "healed_attn"
    args = heal_args(tiny, out, "--train", "attention", "--gradient-checkpointing", "--keep-checkpoint")
    args[args.index("--tokens") + 1] = str(TOKENS // 4)         # 2 steps are enough here
    assert heal_cli.main(args) == 0
    a, b = load_file(conv / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert changed and all(".self_attn." in k for k in changed), changed
    assert {k for k in a if ".self_attn." not in k}.isdisjoint(changed)
    log = json.loads((out / "heal_log.json").read_text())
    n_attn = sum(t.numel() for k, t in a.items() if ".self_attn." in k)
    assert log["trainable_parameters"] == n_attn
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == log["total_steps"] == 2
    # the size care-heal's disk check assumes for a checkpoint is a lower bound of the one written, and close to it
    student = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    trainable = [(n, p) for n, p in student.named_parameters() if ".self_attn." in n]
    written = sum(f.stat().st_size for f in (out / "checkpoint").iterdir())
    assert 0.9 * written < checkpoint_bytes(student, trainable) <= written


@pytest.mark.parametrize("save_every, stop_after, keep", [(2, None, False), (3, 5, False), (None, None, True),
                                                         (3, None, True), (None, 8, False)])
def test_the_disk_check_counts_the_checkpoints_the_run_writes(tiny, tmp_path, monkeypatch, save_every, stop_after,
                                                              keep):
    """heal_state.saves_planned, which the disk check sizes its need by, against the saves a real run makes."""
    from converter.heal_state import saves_planned

    saved = []
    real = heal_mod.save_checkpoint
    monkeypatch.setattr(heal_mod, "save_checkpoint", lambda *a, **k: (saved.append(a[4]["step"]), real(*a, **k)))
    out = tmp_path / "out"
    extra = [*(["--save-every", save_every] if save_every else []),
             *(["--stop-after", stop_after] if stop_after else []), *(["--keep-checkpoint"] if keep else [])]
    assert heal_cli.main(heal_args(tiny, out, *extra)) == 0
    assert saves_planned(0, STEPS, save_every, stop_after, keep) == (len(saved), out.is_dir()), saved


def test_a_save_that_fails_keeps_the_previous_checkpoint_and_says_so(tiny, tmp_path, monkeypatch, capsys):
    """The disk fills up anyway (another process wrote to it): the second --save-every checkpoint fails with
    ENOSPC. care-heal ends with one line naming the step and the checkpoint still there, which --resume continues
    from."""
    real, calls = heal_mod.save_checkpoint, []

    def full_disk_at_the_second(*a, **k):
        calls.append(a[4]["step"])
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(heal_mod, "save_checkpoint", full_disk_at_the_second)
    out = tmp_path / "out"
    assert heal_cli.main(heal_args(tiny, out, "--save-every", "2")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    partial = tmp_path / "out.partial" / "checkpoint"
    assert err == (f"care-heal: error: could not save the checkpoint after step 4: [Errno 28] No space left on device; "
                   f"{partial} still holds step 2 (--resume continues from there)")
    assert not out.exists() and torch.load(partial / "trainer_state.pt", weights_only=False)["step"] == 2
    monkeypatch.setattr(heal_mod, "save_checkpoint", real)
    assert heal_cli.main(heal_args(tiny, out, "--save-every", "2", "--resume")) == 0
    assert json.loads((out / "heal_log.json").read_text())["resumed_at_steps"] == [2]


def test_checkpoints_that_cannot_fit_are_refused_before_the_first_step(tiny, tmp_path, monkeypatch, capsys):
    """Room for the healed checkpoint, not for the training checkpoints that --save-every asks for (each holds the
    fp32 weights and AdamW's moments: 3x this fp32 model's tensors; two are on disk while one is saved): refused
    once the model is loaded, before the first step, not by the first save; without --save-every the same run
    goes ahead. The free space the OS reports is set here (a test cannot fill a filesystem)."""
    from converter.cli_checks import tensor_bytes

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=2 * tensor_bytes(tiny[2])))
    out = tmp_path / "out"
    _refused(capsys, heal_cli.main(heal_args(tiny, out, "--save-every", "2")), out,
             "not enough disk space for the healed checkpoint and 3 training checkpoints of at least")
    args = heal_args(tiny, out)
    args[args.index("--tokens") + 1] = str(TOKENS // 4)
    assert heal_cli.main(args) == 0 and (out / "model.safetensors").is_file()


def test_resume_equals_uninterrupted(tiny, healed):
    out = tiny[0] / "resumed"
    partial = tiny[0] / "resumed.partial"
    assert heal_cli.main(heal_args(tiny, out, "--eval-teacher", "--save-every", "3", "--stop-after", "5")) == 0
    assert not out.exists()
    state = torch.load(partial / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 5 and state["samples_seen"] == 5 * BATCH * ACCUM
    # a plain re-run refuses to clobber the interrupted run; other settings refuse to resume
    assert heal_cli.main(heal_args(tiny, out)) == 2
    assert heal_cli.main(heal_args(tiny, out, "--resume", "--tau", "2")) == 2
    assert partial.is_dir() and not out.exists()
    assert heal_cli.main(heal_args(tiny, out, "--eval-teacher", "--resume")) == 0
    assert not partial.exists()
    a, b = load_file(healed / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la, lb = (json.loads((p / "heal_log.json").read_text()) for p in (healed, out))
    assert la["steps"] == lb["steps"]
    assert la["eval"] == lb["eval"] and la["teacher_ppl"] == lb["teacher_ppl"]
    assert lb["resumed_at_steps"] == [5]
    # what wrote the log (a resumed run: what finished it; converter/versions.py recorded_versions)
    assert la["versions"] == lb["versions"] and lb["versions"]["torch"] == torch.__version__


# care-heal in a process of its own that sends itself a signal at a known point of the run (one thread, as the
# reference run in this process): a scheduler's preemption or time limit, a closed terminal, Ctrl-C
SIGNAL_AT = """
import os, signal, sys
import torch
from converter import heal, heal_cli
torch.set_num_threads(1)
signal.signal(signal.SIGINT, signal.default_int_handler)   # (pytest-xdist's workers ignore Ctrl-C, and so would we)
where, sig = sys.argv[1], getattr(signal, sys.argv[2])
calls = []

def signalling(f, when):
    def g(*args, **kwargs):
        calls.append(1)
        if when(args) == "before":
            os.kill(os.getpid(), sig)
        r = f(*args, **kwargs)
        if when(args) == "after":
            os.kill(os.getpid(), sig)
        return r
    return g

if where == "forward":         # within step 6's first micro-batch (forward and backward passes)
    heal.heal_losses = signalling(heal.heal_losses, lambda a: "before" if len(calls) == 5 * 2 + 1 else None)
elif where == "update":        # within step 6's update, after the optimizer's, before care-heal counts the step
    from torch.optim.lr_scheduler import LambdaLR
    LambdaLR.step = signalling(LambdaLR.step, lambda a: "after" if a[0].last_epoch == 6 else None)
elif where == "evaluation":    # within the held-out evaluation at step 4 (its first two: teacher and student at 0)
    heal.perplexity = signalling(heal.perplexity, lambda a: "before" if len(calls) == 3 else None)
elif where == "save":          # within the checkpoint at step 3, its weights written and its trainer state not
    torch.save = signalling(torch.save, lambda a: "before" if len(calls) == 1 else None)
elif where == "write":         # within writing OUT after the last step, its weights written
    heal.plot_heal_curve = signalling(heal.plot_heal_curve, lambda a: "before")
elif where == "write_kept":    # the same with --keep-checkpoint, its checkpoint moved into OUT's temporary folder
    heal.replace_dir = signalling(heal.replace_dir, lambda a: "before")
elif where == "written":       # once OUT is in place, as OUT.partial/ is removed
    import shutil
    shutil.rmtree = signalling(shutil.rmtree, lambda a: "before" if str(a[0]).endswith(".partial") else None)
elif where in ("swap", "swap_checkpoint"):   # as the healed folder replaces an existing OUT (--overwrite), or
    rename = os.rename                        # step 6's checkpoint step 3's, the old one moved aside
    def aside(src, dst):
        rename(src, dst)
        if os.path.basename(src) == ("out" if where == "swap" else "checkpoint"):
            os.kill(os.getpid(), sig)
    os.rename = aside
elif where == "twice":         # within step 6, and again within the save that the first signal starts
    heal.heal_losses = signalling(heal.heal_losses, lambda a: "before" if len(calls) == 5 * 2 + 1 else None)
    torch.save = signalling(torch.save, lambda a: "before")
sys.exit(heal_cli.main(sys.argv[3:]))
"""


@pytest.mark.parametrize("where, sig, saved", [("forward", "SIGINT", 5), ("update", "SIGTERM", 6),
                                               ("evaluation", "SIGHUP", 4), ("save", "SIGTERM", 3),
                                               ("write", "SIGTERM", 8), ("write_kept", "SIGINT", None),
                                               ("swap_checkpoint", "SIGTERM", 6)])
def test_an_interrupted_run_saves_its_last_update_and_resume_finishes_it(tiny, healed, tmp_path, where, sig, saved):
    """Ctrl-C, SIGTERM (a scheduler's preemption or time limit, `timeout`) or SIGHUP within a run saves the state
    of the last finished update to OUT.partial/checkpoint/ and exits 128 + the signal's number with one line
    that says to --resume; `--resume` then gives the uninterrupted run's weights and log, bit for bit. Within an
    update (the "update" case) the signal is held until the step is counted; raised there, it saved step 5's
    count with step 6's weights, which resumed to other weights. By default SIGTERM kills Python without
    unwinding (converter/interrupts.py). While OUT is written after the last step ("write"), the training is
    saved too: the student was cast to OUT's dtype in place then, and all of it was lost. With --keep-checkpoint
    ("write_kept") the last step's checkpoint, already moved into OUT's temporary folder, goes back to
    OUT.partial/ (saved None: nothing new to save). Between the two renames that swap a checkpoint in
    ("swap_checkpoint"), the signal is held until both are done (converter/write.py)."""
    out = tmp_path / "out"
    args = heal_args(tiny, out, "--eval-teacher", "--save-every", "3",
                     *(["--keep-checkpoint"] if where == "write_kept" else []))
    proc = subprocess.run([sys.executable, "-c", SIGNAL_AT, where, sig, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    signum = getattr(signal, sig)
    assert proc.returncode == 128 + signum, proc.stderr[-3000:]
    said = "interrupted" if sig == "SIGINT" else f"terminated ({sig})"
    ckpt = tmp_path / "out.partial" / "checkpoint"
    holds = f"; {ckpt} holds step {saved} of {STEPS}" if saved else ""
    assert proc.stderr.strip().splitlines()[-1] == \
        f"care-heal: {said}; OUT was not written{holds} (resume with --resume)", proc.stderr[-3000:]
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["checkpoint"]
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert state["step"] == (saved or STEPS) == len(state["log"]["steps"])
    assert heal_cli.main(args + ["--resume"]) == 0
    a, b = load_file(healed / "model.safetensors"), load_file(out / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la, lb = (json.loads((p / "heal_log.json").read_text()) for p in (healed, out))
    assert la["steps"] == lb["steps"] and la["eval"] == lb["eval"]
    assert lb["resumed_at_steps"] == [saved or STEPS]
    assert (out / "checkpoint").is_dir() == (where == "write_kept")


@pytest.mark.parametrize("where", ["written", "swap"])
def test_an_interruption_once_out_is_written_says_so_and_leaves_no_partial_folder(tiny, healed, tmp_path, where):
    """SIGTERM after HEALED is in place, while OUT.partial/ (its checkpoints) is removed ("written"), or between
    the two renames that replace an existing HEALED ("swap": held until both are done, converter/write.py): HEALED
    is the finished run's, OUT.partial/ and the old HEALED go, and the last line says HEALED was written (not "OUT
    was not written", with a checkpoint of the last step saved for a --resume that had nothing left to do)."""
    out = tmp_path / "out"
    if where == "swap":
        out.mkdir()
        (out / "old").touch()
    proc = subprocess.run([sys.executable, "-c", SIGNAL_AT, where, "SIGTERM",
                           *heal_args(tiny, out, "--eval-teacher", "--save-every", "3", "--overwrite")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == "care-heal: terminated (SIGTERM); OUT was written", proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not (out / "old").exists()
    a, b = load_file(healed / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_ctrl_c_abandons_the_save_and_leaves_no_partial_folder(tiny, tmp_path):
    """Ctrl-C twice: the save the first one started is abandoned, and with no earlier checkpoint (no
    --save-every) nothing is left to resume from, so OUT.partial/ goes too (a run that finds it asks for --resume)."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", SIGNAL_AT, "twice", "SIGINT", *heal_args(tiny, out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == "care-heal: interrupted; OUT was not written", proc.stderr[-3000:]
    assert "saving the state after step 5 of 8" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _refused(capsys, rc, out: Path, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert err and err[-1].startswith("care-heal: error:"), err
    for n in needles:
        assert n in err[-1], err[-1]
    assert not out.exists() and not (out.parent / f"{out.name}.partial").exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_bad_input_exits_2_without_out(tiny, tmp_path, capsys):
    root, orig, conv, train, held = tiny
    out = tmp_path / "out"

    def run(*args):
        return heal_cli.main(heal_args(tiny, out, *args))

    a = heal_args(tiny, out)
    a[0] = str(tmp_path / "missing")
    _refused(capsys, heal_cli.main(a), out, "not found")
    a[0] = str(orig)                                    # an original is not a care_mla checkpoint
    _refused(capsys, heal_cli.main(a), out, "care_mla")

    bad_teacher = tmp_path / "teacher"
    shutil.copytree(orig, bad_teacher)
    cfg = json.loads((bad_teacher / "config.json").read_text())
    cfg["vocab_size"] += 64
    (bad_teacher / "config.json").write_text(json.dumps(cfg))
    a = heal_args(tiny, out)
    a[a.index("--teacher") + 1] = str(bad_teacher)
    _refused(capsys, heal_cli.main(a), out, "vocab_size")
    a[a.index("--teacher") + 1] = str(conv)             # the teacher must be the original
    _refused(capsys, heal_cli.main(a), out, "ORIGINAL")

    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    a = heal_args(tiny, out)
    a[a.index("--text") + 1] = str(empty)
    _refused(capsys, heal_cli.main(a), out, "empty")
    a[a.index("--text") + 1] = str(tmp_path / "nope.txt")
    _refused(capsys, heal_cli.main(a), out, "not found")

    _refused(capsys, run("--resume"), out, "no checkpoint")
    for flag in ("--lr", "--tau", "--beta", "--max-grad-norm"):   # nan passed the range checks before
        _refused(capsys, run(flag, "nan"), out, flag)
    # tracebacks before: AdamW's fp32 lr overflowed; the data order's int64 seed overflowed; a perplexity of 1 token
    # failed at the step-0 evaluation, after both models had loaded
    _refused(capsys, run("--lr", "1e39"), out, "--lr within fp32")
    for seed in ("-1", str(2**32), "18446680276303437"):
        _refused(capsys, run("--seed", seed), out, "--seed must be in [0, 2**32)")
    _refused(capsys, run("--eval-tokens", "1"), out, "--eval-tokens must be >= 2")
    one_token = tmp_path / "one_token.txt"
    one_token.write_text("a")
    a = heal_args(tiny, out)
    a[a.index("--eval-text") + 1] = str(one_token)
    _refused(capsys, heal_cli.main(a), out, "--eval-text: need at least 2 tokens to score, the text gives 1")

    out.mkdir()                                          # an existing OUT is kept untouched
    (out / "keep").write_text("x")
    assert run() == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep").read_text() == "x"
    # --overwrite deletes OUT: an OUT holding an input is refused (converter/cli_checks.py prepare_out)
    shutil.copy(train, out / "train.txt")
    a = heal_args(tiny, out, "--overwrite")
    a[a.index("--text") + 1] = str(out / "train.txt")
    assert heal_cli.main(a) == 2
    assert f"--overwrite would delete the --text file {out / 'train.txt'}: it is inside OUT" in capsys.readouterr().err
    assert heal_cli.main(heal_args(tiny, root, "--overwrite")) == 2
    assert f"would delete the converted checkpoint {conv}: it is inside OUT" in capsys.readouterr().err
    assert (out / "keep").read_text() == "x" and (conv / "config.json").is_file()


@pytest.mark.parametrize("how", ["missing_tensor", "truncated"])
def test_a_damaged_converted_checkpoint_is_refused_not_trained(tiny, tmp_path, capsys, how):
    """transformers fills a tensor the files lack with random values and only logs it: care-heal would have trained
    that model. A file it cannot read gave a traceback. Both are one line and exit 2, and nothing is written."""
    bad = damaged_copy(tiny[2], tmp_path / "conv", how)
    a = heal_args(tiny, tmp_path / "out")
    a[0] = str(bad)
    _refused(capsys, heal_cli.main(a), tmp_path / "out", f"cannot load the converted model {bad}",
             *(["no tensor in its files for model.layers.1."] if how == "missing_tensor" else []))


def test_an_out_that_cannot_fit_is_refused_before_training(tiny, healed, tmp_path, monkeypatch, capsys):
    """The healed checkpoint holds the converted one's tensors (same names, shapes and dtype), so it needs their
    bytes: less free space on OUT's filesystem is refused before the models load (converter/heal_options.py), not
    with a write error after the whole run. The
    free space the OS reports is set here (a test cannot fill a filesystem)."""
    from converter.cli_checks import tensor_bytes

    conv = tiny[2]
    assert tensor_bytes(healed) == tensor_bytes(conv) > 0
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=tensor_bytes(conv) - 1))
    out = tmp_path / "out"
    _refused(capsys, heal_cli.main(heal_args(tiny, out)), out, "not enough disk space for the healed checkpoint")


def test_diverged_training_writes_nothing(tiny, tmp_path, capsys):
    """A learning rate that blows the weights up (here 1e30, no clipping) makes the loss non-finite: care-heal
    stops there with exit 2 naming the step, instead of writing the broken weights as OUT."""
    out = tmp_path / "out"
    _refused(capsys, heal_cli.main(heal_args(tiny, out, "--lr", "1e30", "--max-grad-norm", "0")), out,
             "training diverged", "lower --lr")


def test_cli_refuses_bad_input_before_importing_torch(tiny, tmp_path):
    """`care-heal` in a process of its own: a bad option, a missing text file and a leftover OUT.partial/ are
    refused (exit 2, one line) before torch is imported, so a mistyped command is answered at
    once (converter/heal_options.py)."""
    out = tmp_path / "out"
    args = heal_args(tiny, out)
    args[args.index("--tokens") + 1] = "0"
    proc, imported_torch = run_main_alone("converter.heal_cli", *args)
    assert_refused_by("care-heal", proc, out, "--tokens must be positive")
    assert not imported_torch
    args = heal_args(tiny, out)
    args[args.index("--text") + 1] = str(tmp_path / "nope.txt")
    proc, imported_torch = run_main_alone("converter.heal_cli", *args)
    assert_refused_by("care-heal", proc, out, "--text file not found", "nope.txt")
    assert not imported_torch
    (tmp_path / "out.partial").mkdir()                   # kept: it may hold a checkpoint to --resume from
    proc, imported_torch = run_main_alone("converter.heal_cli", *heal_args(tiny, out))
    assert_refused_by("care-heal", proc, out, "an interrupted run", "--resume")
    assert not imported_torch and (tmp_path / "out.partial").is_dir()


def test_heal_qwen3_moe_keeps_the_sparse_layout(tmp_path):
    """A Qwen3-MoE conversion heals like a dense one: the teacher (the original, loaded whole with its
    experts) runs, the loss is finite, and OUT keeps the converted tensors: router and fused 3-D experts
    included, untouched under `--train attention`, trained (same shapes) under `--train all`. Converted with a joint
    latent (`--latent joint`: Qwen3's k_latent_proj and v_latent_proj both write the one latent), which trains as
    any checkpoint does."""
    orig = make_tiny_original(tmp_path / "orig", "qwen3_moe", num_layers=2)
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    conv = tmp_path / "conv"
    convert(orig, conv, calib_files=[calib], kv_ratio=0.5, calib_samples=8, calib_seqlen=64, latent="joint")
    assert json.loads((conv / "config.json").read_text())["joint_latent"] is True
    before = load_file(conv / "model.safetensors")
    assert before["model.layers.0.mlp.experts.gate_up_proj"].ndim == 3
    for train in ("attention", "all"):
        out = tmp_path / f"healed_{train}"
        args = [str(conv), str(out), "--teacher", str(orig), "--text", str(calib), "--tokens",
                str(2 * SEQLEN * BATCH), "--seqlen", str(SEQLEN), "--batch-size", str(BATCH), "--grad-accum", "1",
                "--lr", "2e-3", "--warmup-ratio", "0", "--train", train, "--no-progress"]
        assert heal_cli.main(args) == 0
        log = json.loads((out / "heal_log.json").read_text())
        assert len(log["steps"]) == 2 and all(torch.isfinite(torch.tensor(s["loss"])) for s in log["steps"])
        assert (out / "config.json").read_bytes() == (conv / "config.json").read_bytes()
        after = load_file(out / "model.safetensors")
        assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
        moe = [k for k in before if ".mlp.experts." in k or ".mlp.gate." in k]
        assert len(moe) == 3   # layer 0 sparse (router, gate_up, down), layer 1 dense
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert any(".self_attn.k_latent_proj." in k for k in changed) and any(".self_attn.v_latent_proj." in k
                                                                              for k in changed)
        assert changed.isdisjoint(moe) if train == "attention" else set(moe) <= changed, (train, changed)


def test_parse_tokens():
    assert parse_tokens("50k") == 50_000
    assert parse_tokens("1.5M") == 1_500_000
    assert parse_tokens("2B") == 2_000_000_000
    assert parse_tokens("1234") == 1234
    for bad in ("inf", "-inf", "nan", "abc", "1e400"):   # (inf gave an OverflowError traceback)
        with pytest.raises(argparse.ArgumentTypeError, match="not a token count"):
            parse_tokens(bad)


@pytest.mark.slow
def test_vllm_serves_healed_checkpoint_with_the_same_kv_width(healed):
    """`vllm serve OUT` (care_vllm plugin) on the healed model: healing filled kv_b_proj's zero
    blocks (the default --kv-blocks train), so every layer decodes with the joint latent (the
    converted checkpoints of test_vllm_serve cover the key/value split); greedy tokens equal
    model_defs' and logprobs agree to 1e-3; the KV cache vLLM binds per layer is r_K + r_V + d_r
    wide, so per token it is exactly the config's width."""
    import openai
    from transformers import AutoTokenizer

    from tests.served_reference import compare_concurrent
    from tests.vllm_server import VLLMServer

    kv_bytes = 16 << 20
    cfg = json.loads((healed / "config.json").read_text())
    widths = [k + v + cfg["qk_rope_head_dim"] for k, v in zip(cfg["k_ranks"], cfg["v_ranks"])]
    with VLLMServer(healed, "--dtype", "float32", "--max-model-len", "256", "--kv-cache-memory-bytes",
                    str(kv_bytes), "--max-num-seqs", "4", "--enforce-eager",
                    log_path=healed.parent / "healed.serve.log") as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", timeout=120, max_retries=0)
        name = client.models.list().data[0].id
        r = client.completions.create(model=name, prompt="The small bird", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].text and r.usage.completion_tokens == 8
        assert server.kv_layer_decode_forms() == {l: "joint latent" for l in range(cfg["num_hidden_layers"])}
        tok = AutoTokenizer.from_pretrained(healed)
        prompts = [tok(p)["input_ids"] for p in ("The small bird", TEXT[:90])]
        diff = compare_concurrent(client, _load(healed), prompts, 16)
        assert diff["prompt"] < 1e-3 and diff["generated"] < 1e-3, diff
        shapes = server.kv_layer_shapes()
        assert sorted(shapes) == list(range(cfg["num_hidden_layers"])), server.log_tail()
        assert [shapes[l][-1] for l in range(len(widths))] == widths
        block_size = shapes[0][1]
        assert server.kv_cache_tokens() == (kv_bytes // (block_size * sum(widths) * 4)) * block_size
