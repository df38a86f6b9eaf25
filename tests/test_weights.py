"""Checkpoint quirks load and match transformers; broken checkpoints fail naming what is wrong."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import TINY, TOL, assert_close, hf_forward, hf_model, make_checkpoint, random_batch
from minibert import BertModel
from minibert.weights import CheckpointError

H = TINY["hidden_size"]


@pytest.fixture(scope="module")
def batch():
    # no padding: these tests are about reading weights (padding is covered in test_model.py)
    ids, mask, tt = random_batch(np.random.default_rng(7), TINY, B=3, T=10, pairs=True, pad=False)
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=tt)


def encoder_outputs_match(ours, theirs, what, pooler=True):
    assert_close(ours.last_hidden_state, theirs.last_hidden_state.numpy(), TOL["fp32"], f"{what} last_hidden_state")
    for i, (a, b) in enumerate(zip(ours.hidden_states, theirs.hidden_states)):
        assert_close(a, b.numpy(), TOL["fp32"], f"{what} hidden_states[{i}]")
    if pooler:
        assert_close(ours.pooler_output, theirs.pooler_output.numpy(), TOL["fp32"], f"{what} pooler_output")


def _copy_with(tiny_dir, tmp_path, edit):
    tensors = dict(load_file(tiny_dir / "model.safetensors"))
    edit(tensors)
    d = tmp_path / "broken"
    d.mkdir()
    shutil.copy(tiny_dir / "config.json", d)
    save_file(tensors, d / "model.safetensors")
    return d


def run(model_dir, batch, **kw):
    return BertModel.from_pretrained(model_dir, **kw)(**batch, output_hidden_states=True)


def test_pretraining_checkpoint_with_prefix_and_heads(tmp_path, batch):
    d = make_checkpoint(tmp_path / "pt", cls_name="BertForPreTraining")
    keys = load_file(d / "model.safetensors").keys()
    assert any(k.startswith("bert.") for k in keys) and any(k.startswith("cls.") for k in keys)
    model = BertModel.from_pretrained(d)
    theirs = hf_forward(hf_model(d, cls_name="BertForPreTraining").bert, **batch)
    encoder_outputs_match(model(**batch, output_hidden_states=True), theirs, "BertForPreTraining")
    assert "cls.seq_relationship.weight" in model.heads
    assert "cls.predictions.transform.dense.weight" in model.heads


@pytest.mark.parametrize("cls_name, head_key", [
    ("BertForSequenceClassification", "classifier.weight"),
    ("BertForQuestionAnswering", "qa_outputs.weight"),
    ("BertForTokenClassification", "classifier.bias"),
])
def test_task_checkpoints_load_and_keep_head_weights(tmp_path, batch, cls_name, head_key):
    d = make_checkpoint(tmp_path / "task", cls_name=cls_name)
    model = BertModel.from_pretrained(d)
    assert head_key in model.heads
    theirs = hf_forward(hf_model(d, cls_name=cls_name).bert, **batch)
    encoder_outputs_match(model(**batch, output_hidden_states=True), theirs, cls_name,
                          pooler=cls_name == "BertForSequenceClassification")  # the others have no pooler


def test_masked_lm_checkpoint_has_no_pooler_and_says_why_once(tmp_path, batch, caplog):
    d = make_checkpoint(tmp_path / "mlm", cls_name="BertForMaskedLM")
    assert not any(k.startswith(("pooler", "bert.pooler")) for k in load_file(d / "model.safetensors"))
    with caplog.at_level(logging.WARNING, logger="minibert"):
        model = BertModel.from_pretrained(d)
    lines = [r.getMessage() for r in caplog.records if "pooler" in r.getMessage()]
    assert len(lines) == 1 and "pooler_output is None" in lines[0], lines
    out = model(**batch, output_hidden_states=True)
    assert out.pooler_output is None and model.pooler is None
    assert len(out) == 2  # last_hidden_state, hidden_states: None skipped as in transformers
    theirs = hf_forward(hf_model(d, cls_name="BertForMaskedLM").bert, **batch)
    encoder_outputs_match(out, theirs, "BertForMaskedLM", pooler=False)


def test_legacy_gamma_beta_names(tiny_dir, tmp_path, batch):
    def rename(t):
        for k in [k for k in t if "LayerNorm." in k]:
            t[k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")] = t.pop(k)

    d = _copy_with(tiny_dir, tmp_path, rename)
    assert any(k.endswith("LayerNorm.gamma") for k in load_file(d / "model.safetensors"))
    theirs = hf_forward(hf_model(tiny_dir), **batch)
    encoder_outputs_match(run(d, batch), theirs, "gamma/beta")


def test_position_ids_buffer_in_file_is_ignored(tiny_dir, tmp_path, batch):
    def add_buffer(t):
        t["embeddings.position_ids"] = np.arange(TINY["max_position_embeddings"], dtype=np.int64)[None]

    d = _copy_with(tiny_dir, tmp_path, add_buffer)
    theirs = hf_forward(hf_model(tiny_dir), **batch)
    encoder_outputs_match(run(d, batch), theirs, "position_ids buffer")


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_half_precision_weights_upcast(tmp_path, batch, storage):
    import torch
    import transformers

    cfg = transformers.BertConfig(**TINY)
    from conftest import randomize

    m = randomize(transformers.BertModel(cfg)).to(getattr(torch, storage))
    d = tmp_path / storage
    m.save_pretrained(d)
    with open(d / "model.safetensors", "rb") as f:
        header = f.read(2000)
    assert (b'"BF16"' if storage == "bfloat16" else b'"F16"') in header
    ours = BertModel.from_pretrained(d)
    assert ours.encoder.layer[0].attention.self.query.weight.dtype == np.float32
    theirs = hf_forward(hf_model(d, "float32"), **batch)  # transformers upcasts the same stored values
    encoder_outputs_match(ours(**batch, output_hidden_states=True), theirs, storage)


def test_sharded_checkpoint(tmp_path, batch):
    d = make_checkpoint(tmp_path / "sharded", save_kwargs=dict(max_shard_size="20KB"))
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (d / "model.safetensors").exists()
    encoder_outputs_match(run(d, batch), hf_forward(hf_model(d), **batch), "sharded")


def test_weights_in_compute_dtype_are_not_copied(tiny_dir):
    model = BertModel.from_pretrained(tiny_dir)  # the file is float32
    assert all(not a.flags.owndata for _, a in model.named_parameters())
    m64 = BertModel.from_pretrained(tiny_dir, dtype="float64")
    assert all(a.dtype == np.float64 for _, a in m64.named_parameters())


# -- broken checkpoints -----------------------------------------------------------------------------
def test_missing_tensor_named_with_expected_shape(tiny_dir, tmp_path):
    d = _copy_with(tiny_dir, tmp_path, lambda t: t.pop("encoder.layer.1.attention.self.key.weight"))
    with pytest.raises(CheckpointError, match=rf"missing tensor.*encoder.layer.1.attention.self.key.weight.*\({H}, {H}\)"):
        BertModel.from_pretrained(d)


def test_misshaped_tensor_named_with_both_shapes(tiny_dir, tmp_path):
    def edit(t):
        t["encoder.layer.0.intermediate.dense.weight"] = np.zeros((5, H), dtype=np.float32)

    d = _copy_with(tiny_dir, tmp_path, edit)
    with pytest.raises(CheckpointError, match=rf"'encoder.layer.0.intermediate.dense.weight' has shape \(5, {H}\); "
                                              rf"the config implies \({TINY['intermediate_size']}, {H}\)"):
        BertModel.from_pretrained(d)


def test_only_one_pooler_tensor_is_an_error(tiny_dir, tmp_path):
    d = _copy_with(tiny_dir, tmp_path, lambda t: t.pop("pooler.dense.bias"))
    with pytest.raises(CheckpointError, match="pooler.dense.bias"):
        BertModel.from_pretrained(d)


def test_integer_weight_is_an_error(tiny_dir, tmp_path):
    def edit(t):
        t["embeddings.LayerNorm.bias"] = np.zeros(H, dtype=np.int32)

    d = _copy_with(tiny_dir, tmp_path, edit)
    with pytest.raises(CheckpointError, match="'embeddings.LayerNorm.bias' has dtype int32"):
        BertModel.from_pretrained(d)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_file_named(tiny_dir, tmp_path, damage):
    d = tmp_path / damage
    d.mkdir()
    shutil.copy(tiny_dir / "config.json", d)
    data = (tiny_dir / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=rf"{d / 'model.safetensors'} is not a valid safetensors file"):
        BertModel.from_pretrained(d)


def test_pickle_only_checkpoint_refused_with_conversion_hint(tiny_dir, tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(tiny_dir / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="safetensors only and never unpickles.*save_pretrained"):
        BertModel.from_pretrained(d)


def test_no_weights_at_all(tiny_dir, tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    shutil.copy(tiny_dir / "config.json", d)
    with pytest.raises(CheckpointError, match="has no model.safetensors or model.safetensors.index.json"):
        BertModel.from_pretrained(d)


def test_no_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        BertModel.from_pretrained(tmp_path)


def test_index_naming_a_missing_shard(tmp_path):
    d = make_checkpoint(tmp_path / "sh", save_kwargs=dict(max_shard_size="20KB"))
    shard = sorted(d.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"names shard.*{shard.name}"):
        BertModel.from_pretrained(d)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        BertModel.from_pretrained(str(tmp_path / "nope"))


# -- Hub ids --------------------------------------------------------------------------------------
def _run_offline(code, hf_home):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_uncached_repo_id_offline_gives_clear_error(tmp_path):
    r = _run_offline("from minibert import BertModel; BertModel.from_pretrained('some-org/bert-nowhere')", tmp_path)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("OSError: could not get model 'some-org/bert-nowhere'"), r.stderr
    assert "HF_HUB_OFFLINE" in last and "local directory" in last


def test_repo_id_served_from_the_hub_cache_offline(tiny_dir, tmp_path, batch):
    # the cache layout huggingface_hub reads: models--org--name/{refs/main, snapshots/<commit>/...}
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--test-org--tiny-bert"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_dir / f, snap)
    code = ("import numpy as np; from minibert import BertModel; "
            "m = BertModel.from_pretrained('test-org/tiny-bert'); "
            f"assert BertModel.from_pretrained('test-org/tiny-bert', revision={commit!r}).config.hidden_size; "
            f"np.save({str(tmp_path / 'out.npy')!r}, m({batch['input_ids'].tolist()}).last_hidden_state)")
    r = _run_offline(code, tmp_path)
    assert r.returncode == 0, r.stderr
    expected = BertModel.from_pretrained(tiny_dir)(batch["input_ids"]).last_hidden_state
    # the same weights give the same numbers; across two processes only to rounding (a full CI run
    # once saw 8e-7: summation order in SIMD loops can follow memory alignment), never O(1) apart
    assert_close(np.load(tmp_path / "out.npy"), expected, TOL["batching_fp32"], "saved embeddings")


def test_release_pages_drops_only_our_own_unmodified_maps(tmp_path, tiny_dir):
    """Fused Q/K/V hand the pages of the originals back to the OS. A caller's own copy-on-write map
    is never touched: dropping its pages would undo the caller's edits."""
    from minibert.weights import read_safetensors, release_pages

    path = tmp_path / "raw.bin"
    np.arange(4096, dtype=np.float32).tofile(path)
    theirs = np.memmap(path, dtype=np.float32, mode="c")
    theirs[:2048] = -1  # an edit that lives only in this process
    release_pages(theirs[:2048])
    assert (theirs[:2048] == -1).all()

    tensors = read_safetensors([tiny_dir / "model.safetensors"])
    name, arr = max(tensors.items(), key=lambda kv: kv[1].nbytes)
    before = np.array(arr)
    release_pages(arr)  # ours: dropped, and read back from the file when touched again
    np.testing.assert_array_equal(arr, before)


def _mapped_rss_kb(path):  # resident kB of this process's mappings of ``path`` (/proc/self/smaps)
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if len(head) >= 6 and "-" in head[0] and ":" in head[3]:  # a mapping's header line
            inside = head[5] == str(path)
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_release_pages_really_drops_the_pages_of_a_loaded_tensor(tmp_path):
    """A tensor read_safetensors mapped (a view of a memmap slice of the file's map) leaves the
    process's RSS when released, and reads back unchanged."""
    from minibert.weights import read_safetensors, release_pages

    path = tmp_path / "big.safetensors"
    save_file({"w": np.arange(2 << 20, dtype=np.float32).reshape(2048, 1024)}, str(path))
    arr = read_safetensors([path])["w"]
    total = float(arr.sum(dtype=np.float64))  # every page touched
    before = _mapped_rss_kb(path)
    assert before > 7000, f"the 8 MB tensor is not resident: {before} kB"
    release_pages(arr)
    after = _mapped_rss_kb(path)
    assert after < before - 7000, f"resident kB of the mapping: {before} before release, {after} after"
    assert float(arr.sum(dtype=np.float64)) == total


def test_float8_tensor_is_a_checkpoint_error_naming_tensor_and_dtypes(tiny_dir, tmp_path):
    import torch
    from safetensors.torch import load_file as load_torch, save_file as save_torch

    for f in ("config.json",):
        shutil.copy(tiny_dir / f, tmp_path / f)
    tensors = load_torch(str(tiny_dir / "model.safetensors"))
    name = "encoder.layer.0.output.dense.weight"
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    save_torch(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' in model.safetensors has dtype F8_E4M3; "
                                              r"minibert reads .*F32"):
        BertModel.from_pretrained(tmp_path)
