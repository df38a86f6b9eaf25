"""Taps (capture=[globs]) against transformers' forward hooks on the matching modules."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import minibert
from conftest import TINY, TOL, assert_close, hf_model, make_checkpoint, random_batch


def hooked_forward(model, ids, mask, tt):
    """transformers' intermediates by our tap names, from forward hooks."""
    got = {}
    cfg = model.config
    nH, dH = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads

    def keep(name, pick=lambda out: out):
        def hook(module, args, out):
            got[name] = pick(out).detach()
        return hook

    def heads(t):  # [B, T, H] -> [B, nH, T, dH]
        B, T, _ = t.shape
        return t.view(B, T, nH, dH).transpose(1, 2)

    handles = [model.embeddings.register_forward_hook(keep("embeddings"))]
    for i, layer in enumerate(model.encoder.layer):
        p = f"encoder.layer.{i}."
        for part in ("query", "key", "value"):
            m = getattr(layer.attention.self, part)
            handles.append(m.register_forward_hook(keep(p + "attention.self." + part, heads)))
        handles.append(layer.attention.self.register_forward_hook(keep(p + "attention.self.context", lambda o: o[0])))
        handles.append(layer.attention.output.register_forward_hook(keep(p + "attention.output")))
        handles.append(layer.intermediate.register_forward_hook(keep(p + "intermediate")))
        handles.append(layer.output.register_forward_hook(keep(p + "output")))
    handles.append(model.pooler.dense.register_forward_hook(keep("pooler.dense")))
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                    token_type_ids=torch.as_tensor(tt), output_attentions=True)
    for h in handles:
        h.remove()
    # the scores have no module of their own in transformers' eager attention: rebuild them from the
    # hooked query and key and the additive mask transformers uses, torch.where(mask, 0, finfo.min)
    add = torch.where(torch.as_tensor(mask).bool(), 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}.attention.self."
        got[p + "scores"] = got[p + "query"] @ got[p + "key"].transpose(-1, -2) * dH ** -0.5 + add
        got[p + "probs"] = out.attentions[i]
    return got


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("taps"), seed=21)


@pytest.mark.parametrize("kernels", ["numba", "numpy"])
def test_every_tap_matches_transformers_hooks(checkpoint, kernels):
    model = minibert.BertModel.from_pretrained(checkpoint, kernels=kernels)
    ids, mask, tt = random_batch(np.random.default_rng(5), TINY, B=3, T=10, pairs=True)
    out = model(ids, mask, tt, capture=["*"])
    theirs = hooked_forward(hf_model(checkpoint), ids, mask, tt)
    assert list(out.captures) == model.tap_names() and set(theirs) == set(model.tap_names())
    B, T, H, I, nH = 3, 10, TINY["hidden_size"], TINY["intermediate_size"], TINY["num_attention_heads"]
    shapes = {"embeddings": (B, T, H), "query": (B, nH, T, H // nH), "key": (B, nH, T, H // nH),
              "value": (B, nH, T, H // nH), "scores": (B, nH, T, T), "probs": (B, nH, T, T), "context": (B, T, H),
              "attention.output": (B, T, H), "intermediate": (B, T, I), "output": (B, T, H), "pooler.dense": (B, H)}
    for name, ours in out.captures.items():
        shape = next(v for k, v in shapes.items() if name.endswith(k))
        assert ours.shape == shape, f"{name}: {ours.shape} != {shape}"
        ref = theirs[name].numpy()
        if name.endswith("scores"):  # masked entries are finfo.min + score: compare them relatively
            valid = np.broadcast_to(mask[:, None, None, :].astype(bool), ref.shape)
            assert_close(ours[valid], ref[valid], TOL["fp32"], name)
            assert_close(ours[~valid] / ref[~valid], np.ones(int((~valid).sum())), TOL["route_fp32"], name + " masked")
        else:
            assert_close(ours, ref, TOL["fp32"], name)


def test_taps_agree_with_the_usual_outputs(checkpoint):
    model = minibert.BertModel.from_pretrained(checkpoint)
    ids, mask, _ = random_batch(np.random.default_rng(6), TINY)
    out = model(ids, mask, output_hidden_states=True, output_attentions=True,
                capture=["embeddings", "encoder.layer.*.output", "encoder.layer.*.attention.self.probs", "pooler.dense"])
    np.testing.assert_array_equal(out.captures["embeddings"], out.hidden_states[0])
    for i in range(TINY["num_hidden_layers"]):
        np.testing.assert_array_equal(out.captures[f"encoder.layer.{i}.output"], out.hidden_states[i + 1])
        np.testing.assert_array_equal(out.captures[f"encoder.layer.{i}.attention.self.probs"], out.attentions[i])
    np.testing.assert_array_equal(np.tanh(out.captures["pooler.dense"]), out.pooler_output)
    # a glob takes exactly what it matches: "*.output" also matches attention.output
    assert sorted(k for k in out.captures if k.endswith("output")) == sorted(
        [f"encoder.layer.{i}.output" for i in range(2)] + [f"encoder.layer.{i}.attention.output" for i in range(2)])


def test_capture_selects_and_defaults(checkpoint):
    model = minibert.BertModel.from_pretrained(checkpoint)
    ids = np.array([[2, 7, 9, 3]])
    plain = model(ids)
    assert plain.captures is None and "captures" not in plain and len(plain) == 2  # unchanged when not asked
    one = model(ids, capture="encoder.layer.1.intermediate")
    assert list(one.captures) == ["encoder.layer.1.intermediate"]
    assert one.captures["encoder.layer.1.intermediate"].shape == (1, 4, TINY["intermediate_size"])
    # taps change results by rounding only: they run the dense path, q·kᵀ by BLAS, not the attention kernel
    assert_close(one.last_hidden_state, plain.last_hidden_state, TOL["kernel_fp32"], "captured vs plain")
    assert model(ids, capture=[]).captures == {}
    names = model.tap_names()
    assert len(names) == 1 + 9 * TINY["num_hidden_layers"] + 1 and names[0] == "embeddings"


def test_tap_names_without_pooler(tmp_path):
    path = make_checkpoint(tmp_path, cls_name="BertForMaskedLM")
    mlm = minibert.BertForMaskedLM.from_pretrained(path)
    assert "pooler.dense" not in mlm.tap_names()
    out = mlm(np.array([[2, 5, 3]]), capture="encoder.layer.0.attention.self.query")
    assert out.captures["encoder.layer.0.attention.self.query"].shape == (1, TINY["num_attention_heads"], 3, 8)


@pytest.mark.parametrize("capture,err,match", [
    ("encoder.layer.9.output", ValueError, r"capture pattern 'encoder.layer.9.output' matches no tap"),
    (["pooler.dense", 3], TypeError, r"capture entries must be strings.*3"),
    (5, TypeError, r"capture must be a tap name, a glob pattern or a list of them; got 5"),
])
def test_bad_capture(checkpoint, capture, err, match):
    model = minibert.BertModel.from_pretrained(checkpoint)
    with pytest.raises(err, match=match):
        model(np.array([[2, 3]]), capture=capture)
