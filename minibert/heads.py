"""Task models: BertModel plus the head a fine-tuned or pre-trained checkpoint carries.

Names, outputs and numbers are transformers': ``model.bert`` is the encoder,
``model.cls.predictions.transform.dense.weight``, ``model.classifier.weight`` and
``model.qa_outputs.weight`` are the checkpoint's tensors, and each call returns the same
output class with the same fields.

The one deliberate difference: a checkpoint without the head's weights is an error that names
the missing tensors. transformers initialises them at random with a warning, which gives
confident nonsense.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

import numpy as np

from . import model as F
from .bert import BertModel, load_pretrained
from .config import ACTIVATIONS, BertConfig
from .losses import bce_with_logits, class_labels, cross_entropy, mse
from .modules import Activation, LayerNorm, Linear, Module
from .outputs import (
    LogitLensOutput,
    BertForPreTrainingOutput,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    NextSentencePredictorOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from .weights import CheckpointError, nest, to_dtype

logger = logging.getLogger(__name__)

DECODER = "cls.predictions.decoder.weight"
DECODER_BIAS = "cls.predictions.decoder.bias"
OPTIONAL = (DECODER, DECODER_BIAS)  # tied to other tensors when absent


def num_labels(config: BertConfig) -> int:
    """transformers' rule: the size of ``id2label`` when the config has one, else ``num_labels``, else 2."""
    id2label = config.extra.get("id2label")
    if id2label:
        return len(id2label)
    return int(config.extra.get("num_labels", 2))


def id2label(config: BertConfig) -> Dict[int, str]:
    """``config.id2label`` with int keys (config.json stores them as strings)."""
    raw = config.extra.get("id2label") or {}
    labels = {int(k): str(v) for k, v in raw.items()}
    return labels or {i: f"LABEL_{i}" for i in range(num_labels(config))}


# -- the head modules (a view over the nested head params, as modules.py is for the encoder) -------
class BertPredictionHeadTransform(Module):
    def __init__(self, p, config, k):
        super().__init__(p)
        self._add("dense", Linear(p["dense"]))
        self._add("transform_act_fn", Activation(config.hidden_act, k[ACTIVATIONS[config.hidden_act]]))
        self._add("LayerNorm", LayerNorm(p["LayerNorm"], config.layer_norm_eps, k))


class Decoder(Linear):
    """The vocabulary projection. A tied parameter (the weight: the word embedding matrix; the
    bias: ``cls.predictions.bias``) is one array under two names, as a shared torch Parameter:
    assigning it under either name changes both."""

    def __init__(self, p, ties: Dict[str, Dict]):  # ties: {param name: the params dict that owns it}
        super().__init__(p)
        object.__setattr__(self, "_ties", ties)
        self.sync()

    def sync(self):
        for name, owner in self._ties.items():
            self._params[name] = owner[name]

    def __getattr__(self, name):
        ties = self.__dict__.get("_ties", {})
        if name in ties:
            return ties[name][name]
        return super().__getattr__(name)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in self.__dict__.get("_ties", {}):
            self._ties[name][name] = self._params[name]


class BertLMPredictionHead(Module):
    _param_names = ("bias",)

    def __init__(self, p, config, k, ties):
        super().__init__(p)
        self._cfg, self._k = config, k
        self._add("transform", BertPredictionHeadTransform(p["transform"], config, k))
        self._add("decoder", Decoder(p["decoder"], ties))

    def forward(self, h):  # [..., H] -> [..., V]
        c = self._cfg
        self.decoder.sync()
        return F.lm_head(np.asarray(h), **self._params, eps=c.layer_norm_eps, act=ACTIVATIONS[c.hidden_act], k=self._k)


class BertOnlyMLMHead(Module):
    def __init__(self, p, config, k, ties):
        super().__init__(p)
        self._add("predictions", BertLMPredictionHead(p["predictions"], config, k, ties))


class BertOnlyNSPHead(Module):
    def __init__(self, p):
        super().__init__(p)
        self._add("seq_relationship", Linear(p["seq_relationship"]))


class BertPreTrainingHeads(Module):
    def __init__(self, p, config, k, ties):
        super().__init__(p)
        self._add("predictions", BertLMPredictionHead(p["predictions"], config, k, ties))
        self._add("seq_relationship", Linear(p["seq_relationship"]))


# -- task models -----------------------------------------------------------------------------------
class BertPreTrainedModel(Module):
    """What every task model shares: loading, the encoder as ``.bert``, the head checks."""

    needs_pooler = False  # the head reads pooler_output (NSP, sequence classification)

    def __init__(self, config: BertConfig, params: Dict[str, np.ndarray], heads: Dict[str, np.ndarray], *,
                 kernels: str = "numba", name_or_path: Optional[str] = None, skip_padding: bool = False):
        super().__init__()
        bert = BertModel(config, params, kernels=kernels, heads=heads, name_or_path=name_or_path,
                         skip_padding=skip_padding)
        if self.needs_pooler and bert.pooler is None:
            raise CheckpointError(
                f"checkpoint is missing tensor(s) ['pooler.dense.weight', 'pooler.dense.bias'] that "
                f"{type(self).__name__} needs (its head reads pooler_output); transformers would "
                "initialise them at random"
            )
        self.config, self.kernels, self.dtype, self.name_or_path = config, kernels, bert.dtype, name_or_path
        self._k = bert._k
        self._add("bert", bert)
        shapes = self.head_shapes(config)
        flat = self._check_heads(heads, shapes, bert)
        object.__setattr__(self, "_params", nest(flat))
        unused = sorted(set(heads) - set(shapes))
        if unused:
            logger.warning("ignoring %d head tensor(s) %s does not use: %s", len(unused), type(self).__name__,
                           ", ".join(unused[:8]))
        self._build()

    # subclasses: the head tensors they need, their module tree and their forward
    @classmethod
    def head_shapes(cls, config: BertConfig) -> Dict[str, Tuple[int, ...]]:
        raise NotImplementedError

    def _build(self):
        raise NotImplementedError

    def _check_heads(self, heads, shapes, bert) -> Dict[str, np.ndarray]:
        missing = [n for n in shapes if n not in heads and n not in OPTIONAL]
        if missing:
            raise CheckpointError(
                f"checkpoint is missing tensor(s) {missing} that {type(self).__name__} needs; expected shapes "
                + ", ".join(f"{n}: {shapes[n]}" for n in missing)
                + ". Is this a checkpoint of another task? (transformers would initialise them at random)"
            )
        flat: Dict[str, np.ndarray] = {}
        for name, shape in shapes.items():
            if name not in heads:
                continue
            if tuple(heads[name].shape) != shape:
                raise CheckpointError(f"tensor {name!r} has shape {tuple(heads[name].shape)}; the config implies {shape}")
            flat[name] = to_dtype(name, heads[name], self.dtype)
        self._tied = self._tie_decoder(flat, bert) if DECODER in shapes else ()
        return flat

    def _tie_decoder(self, flat, bert) -> Tuple[str, ...]:
        """Which decoder tensors are tied (removed from ``flat``): transformers 5 ties the decoder's
        weight to the word embedding matrix and its bias to cls.predictions.bias
        (tie_word_embeddings, the default), unless the file stores its own decoder tensor with
        other values: then that one is used, untied. With tie_word_embeddings=false there is
        nothing to tie to, so the weight must be in the file."""
        emb = bert._params["embeddings"]["word_embeddings"]["weight"]
        tied = []
        if DECODER not in flat and not self.config.extra.get("tie_word_embeddings", True):
            raise CheckpointError(
                f"checkpoint is missing tensor(s) ['{DECODER}'] that {type(self).__name__} needs: the "
                "config sets tie_word_embeddings=false, so the decoder is not the word embedding matrix")
        if DECODER not in flat or np.array_equal(flat[DECODER], emb):
            flat.pop(DECODER, None)
            tied.append("weight")
        if DECODER_BIAS not in flat or np.array_equal(flat[DECODER_BIAS], flat["cls.predictions.bias"]):
            flat.pop(DECODER_BIAS, None)
            tied.append("bias")
        return tuple(tied)

    def _lm_params(self) -> Dict:
        """cls.predictions' params with the tied decoder tensors in place (they are read from their
        owners at every call, so an assignment to either name is seen)."""
        preds = self._params["cls"]["predictions"]
        dec = preds.setdefault("decoder", {})
        for name, owner in self._ties().items():
            dec[name] = owner[name]
        return preds

    def _ties(self) -> Dict[str, Dict]:
        """{decoder param name: the params dict that owns it} for the tied ones."""
        owners = {"weight": self.bert._params["embeddings"]["word_embeddings"],
                  "bias": self._params["cls"]["predictions"]}
        return {name: owners[name] for name in self._tied}

    @classmethod
    def from_pretrained(cls, name_or_path=None, *, dtype="float32", kernels="numba", revision: Optional[str] = None,
                        cache_dir=None, local_files_only: bool = False, attn_implementation: Optional[str] = None,
                        skip_padding: bool = False, **config_overrides):
        """As :meth:`minibert.BertModel.from_pretrained`; the checkpoint must hold the head's weights.

        ``num_labels=n`` (as in transformers) keeps the checkpoint's labels when there are n of them
        and replaces them by LABEL_0 ... LABEL_{n-1} otherwise; the classifier in the file must have
        n outputs."""
        n = config_overrides.pop("num_labels", None)
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
            raise ValueError(f"num_labels={n!r}; expected a positive integer")
        config, params, heads, name = load_pretrained(
            name_or_path, dtype=dtype, kernels=kernels, pooler=cls.needs_pooler, revision=revision,
            cache_dir=cache_dir, local_files_only=local_files_only, attn_implementation=attn_implementation,
            config_overrides=config_overrides, num_labels=n)
        return cls(config, params, heads, kernels=kernels, name_or_path=name, skip_padding=skip_padding)

    @property
    def skip_padding(self) -> bool:
        """The encoder's mode (:meth:`minibert.BertModel.from_pretrained`): False computes padding
        positions as transformers does; True runs padded batches packed."""
        return self.bert.skip_padding

    @skip_padding.setter
    def skip_padding(self, value):
        self.bert.skip_padding = bool(value)

    def _encode(self, input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                output_attentions, capture, *labels, inputs_embeds=None, head_mask=None, patch=None) -> Dict:
        # with labels, the loss is transformers' own only if padding positions are computed as it
        # does (labels there need not be -100): such calls run the dense batch
        dense = any(y is not None for y in labels)
        return self.bert.run(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                             output_attentions, capture, skip_padding=False if dense else None,
                             inputs_embeds=inputs_embeds, head_mask=head_mask, patch=patch)

    def tap_names(self):
        """The encoder's taps (:meth:`minibert.BertModel.tap_names`); ``capture=`` takes them here too."""
        return self.bert.tap_names()

    def _lm_logits(self, h):  # [B, T, H] -> [B, T, V]
        c = self.config
        return F.lm_head(h, **self._lm_params(), eps=c.layer_norm_eps, act=ACTIVATIONS[c.hidden_act], k=self._k)

    @staticmethod
    def _finish(result, return_dict):
        return result.to_tuple() if return_dict is False else result


def _lm_shapes(config: BertConfig) -> Dict[str, Tuple[int, ...]]:
    H, V = config.hidden_size, config.vocab_size
    return {
        "cls.predictions.transform.dense.weight": (H, H),
        "cls.predictions.transform.dense.bias": (H,),
        "cls.predictions.transform.LayerNorm.weight": (H,),
        "cls.predictions.transform.LayerNorm.bias": (H,),
        "cls.predictions.bias": (V,),
        DECODER: (V, H),
        DECODER_BIAS: (V,),
    }


def _nsp_shapes(config: BertConfig) -> Dict[str, Tuple[int, ...]]:
    return {"cls.seq_relationship.weight": (2, config.hidden_size), "cls.seq_relationship.bias": (2,)}


class BertForMaskedLM(BertPreTrainedModel):
    """``logits`` [B, T, V] over the vocabulary at every position; ``labels`` [B, T] (-100: not scored)."""

    @classmethod
    def head_shapes(cls, config):
        return _lm_shapes(config)

    def _build(self):
        self._add("cls", BertOnlyMLMHead({"predictions": self._lm_params()}, self.config, self._k, self._ties()))

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                 output_hidden_states=None, output_attentions=None, return_dict=None, capture=None, inputs_embeds=None,
                head_mask=None, patch=None) -> MaskedLMOutput:
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                           output_attentions, capture, labels, inputs_embeds=inputs_embeds,
                           head_mask=head_mask, patch=patch)
        logits = self._lm_logits(out["last_hidden_state"])  # [B, T, V]
        loss = None
        if labels is not None:
            y = class_labels("labels", labels, logits.shape[:2], logits.shape[-1])
            loss = cross_entropy(logits, y)
        return self._finish(MaskedLMOutput(loss=loss, logits=logits, hidden_states=out["hidden_states"],
                                           attentions=out["attentions"], captures=out["captures"]), return_dict)

    def logit_lens(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, *,
                   top_k: int = 5, inputs_embeds=None, tokenizer=None, patch=None) -> LogitLensOutput:
        """The MLM head applied to every hidden state, the embeddings' and each layer's (the "logit
        lens", nostalgebraist 2020): what the model would predict if it stopped at layer l. The
        last row is ``model(**x).logits``. ``top_tokens`` come from ``tokenizer``, by default the
        checkpoint's own (None if it has none); ``patch=`` as in :meth:`forward`."""
        V = self.config.vocab_size
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= V:
            raise ValueError(f"top_k must be an integer from 1 to the vocabulary size {V}; got {top_k!r}")
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, True, False, None,
                           inputs_embeds=inputs_embeds, patch=patch)
        logits = np.stack([self._lm_logits(h) for h in out["hidden_states"]]).astype(np.float32, copy=False)
        part = np.argpartition(-logits, top_k - 1, axis=-1)[..., :top_k]  # the k best, unordered
        vals = np.take_along_axis(logits, part, axis=-1)
        order = np.lexsort((part, -vals), axis=-1)  # best first, ties by the lower id
        top_ids = np.take_along_axis(part, order, axis=-1)
        x = logits.astype(np.float64)
        m = x.max(axis=-1, keepdims=True)
        log_z = m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))  # log-sum-exp over the vocabulary
        top_probs = np.exp(np.take_along_axis(x, top_ids, axis=-1) - log_z).astype(np.float32)
        if tokenizer is None:
            from .tokenizer import checkpoint_tokenizer

            tokenizer = checkpoint_tokenizer(self.name_or_path)
        tokens = None
        if tokenizer is not None:
            flat = tokenizer.convert_ids_to_tokens(top_ids.reshape(-1).tolist())
            tokens = np.array(flat, dtype=object).reshape(top_ids.shape).tolist()
        return LogitLensOutput(logits=logits, top_ids=top_ids, top_tokens=tokens, top_probs=top_probs)



class BertForNextSentencePrediction(BertPreTrainedModel):
    """``logits`` [B, 2] from pooler_output: index 0 means sentence B follows sentence A."""

    needs_pooler = True

    @classmethod
    def head_shapes(cls, config):
        return _nsp_shapes(config)

    def _build(self):
        self._add("cls", BertOnlyNSPHead(self._params["cls"]))

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                 output_hidden_states=None, output_attentions=None, return_dict=None, capture=None, inputs_embeds=None,
                head_mask=None, patch=None) -> NextSentencePredictorOutput:
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                           output_attentions, capture, labels, inputs_embeds=inputs_embeds,
                           head_mask=head_mask, patch=patch)
        logits = F.linear(out["pooler_output"], **self._params["cls"]["seq_relationship"])  # [B, 2]
        loss = None
        if labels is not None:
            loss = cross_entropy(logits, class_labels("labels", labels, logits.shape[:1], 2))
        return self._finish(NextSentencePredictorOutput(loss=loss, logits=logits, hidden_states=out["hidden_states"],
                                                        attentions=out["attentions"], captures=out["captures"]), return_dict)


class BertForPreTraining(BertPreTrainedModel):
    """``prediction_logits`` [B, T, V] and ``seq_relationship_logits`` [B, 2]; the loss needs both
    ``labels`` [B, T] and ``next_sentence_label`` [B]."""

    needs_pooler = True

    @classmethod
    def head_shapes(cls, config):
        return {**_lm_shapes(config), **_nsp_shapes(config)}

    def _build(self):
        p = {"predictions": self._lm_params(), "seq_relationship": self._params["cls"]["seq_relationship"]}
        self._add("cls", BertPreTrainingHeads(p, self.config, self._k, self._ties()))

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                 next_sentence_label=None, output_hidden_states=None, output_attentions=None,
                 return_dict=None, capture=None, inputs_embeds=None,
                head_mask=None, patch=None) -> BertForPreTrainingOutput:
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                           output_attentions, capture, labels, next_sentence_label, inputs_embeds=inputs_embeds,
                           head_mask=head_mask, patch=patch)
        mlm = self._lm_logits(out["last_hidden_state"])  # [B, T, V]
        nsp = F.linear(out["pooler_output"], **self._params["cls"]["seq_relationship"])  # [B, 2]
        loss = None
        if (labels is None) != (next_sentence_label is None):
            raise ValueError("BertForPreTraining's loss needs both labels and next_sentence_label; got only "
                             + ("labels" if labels is not None else "next_sentence_label"))
        if labels is not None:
            loss = (cross_entropy(mlm, class_labels("labels", labels, mlm.shape[:2], mlm.shape[-1])) +
                    cross_entropy(nsp, class_labels("next_sentence_label", next_sentence_label, nsp.shape[:1], 2),
                                  what="next_sentence_label"))
        return self._finish(BertForPreTrainingOutput(
            loss=loss, prediction_logits=mlm, seq_relationship_logits=nsp, hidden_states=out["hidden_states"],
            attentions=out["attentions"], captures=out["captures"]), return_dict)


class _Classifier(BertPreTrainedModel):
    head_name = "classifier"

    @property
    def num_labels(self) -> int:
        return num_labels(self.config)

    @property
    def id2label(self) -> Dict[int, str]:
        return id2label(self.config)

    @classmethod
    def head_shapes(cls, config):
        n = 2 if cls.head_name == "qa_outputs" else num_labels(config)
        return {f"{cls.head_name}.weight": (n, config.hidden_size), f"{cls.head_name}.bias": (n,)}

    def _build(self):
        self._add(self.head_name, Linear(self._params[self.head_name]))


class BertForSequenceClassification(_Classifier):
    """``logits`` [B, num_labels] from pooler_output. ``config.id2label`` names the classes;
    ``config.problem_type`` ("single_label_classification", "multi_label_classification",
    "regression") says how to read them and which loss ``labels`` get, as in transformers."""

    needs_pooler = True

    @property
    def problem_type(self) -> Optional[str]:
        return self.config.extra.get("problem_type")

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                 output_hidden_states=None, output_attentions=None, return_dict=None, capture=None, inputs_embeds=None,
                head_mask=None, patch=None) -> SequenceClassifierOutput:
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                           output_attentions, capture, labels, inputs_embeds=inputs_embeds,
                           head_mask=head_mask, patch=patch)
        logits = F.linear(out["pooler_output"], **self._params["classifier"])  # [B, num_labels]
        loss = None if labels is None else self._loss(logits, labels)
        return self._finish(SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out["hidden_states"],
                                                     attentions=out["attentions"], captures=out["captures"]), return_dict)

    def _loss(self, logits, labels):
        B, n = logits.shape
        y = np.asarray(labels)
        pt = self.problem_type
        if pt is None:  # transformers infers it from num_labels and the labels' dtype
            pt = "regression" if n == 1 else ("single_label_classification" if y.dtype.kind in "iu"
                                              else "multi_label_classification")
        if pt == "regression":
            if y.dtype.kind not in "iuf" or y.size != B * n:
                raise ValueError(f"labels for regression must be {B * n} numbers ([{B}]"
                                 f"{' or [' + str(B) + ', 1]' if n == 1 else ''}); got shape {y.shape}, dtype {y.dtype}")
            return mse(logits.reshape(-1), y.reshape(-1))
        if pt == "single_label_classification":
            return cross_entropy(logits, class_labels("labels", y.reshape(-1) if y.size == B else y, (B,), n))
        if pt == "multi_label_classification":
            if y.shape != (B, n) or y.dtype.kind not in "iubf":
                raise ValueError(f"labels for multi_label_classification must be [{B}, {n}] of 0/1; "
                                 f"got shape {y.shape}, dtype {y.dtype}")
            return bce_with_logits(logits, y)
        raise ValueError(f"config problem_type={pt!r}; expected 'regression', 'single_label_classification' "
                         "or 'multi_label_classification'")


class BertForMultipleChoice(_Classifier):
    """``logits`` [B, num_choices]: each choice of ``input_ids`` [B, num_choices, T] (and the other
    inputs shaped alike; ``inputs_embeds`` [B, num_choices, T, H]) runs as one row of a
    [B·num_choices, T] batch, and its pooler_output gets one score (``classifier`` [1, H]), as
    transformers. ``labels`` [B]: the right choice's index."""

    needs_pooler = True

    @classmethod
    def head_shapes(cls, config):
        return {"classifier.weight": (1, config.hidden_size), "classifier.bias": (1,)}

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=None, output_attentions=None, return_dict=None, capture=None,
                inputs_embeds=None, head_mask=None, patch=None) -> MultipleChoiceModelOutput:
        lead = np.shape(input_ids if input_ids is not None else inputs_embeds)
        if len(lead) != (3 if input_ids is not None else 4):
            name = "input_ids" if input_ids is not None else "inputs_embeds"
            raise ValueError(f"{name} has shape {lead}; BertForMultipleChoice expects [B, num_choices, T"
                             f"{', H' if input_ids is None else ''}]")
        B, C = lead[:2]

        def flat(name, a, extra=0):  # [B, C, T(, H)] -> [B·C, T(, H)]
            if a is None:
                return None
            a = np.asarray(a)
            if a.shape[:2] != (B, C) or a.ndim != 3 + extra:
                raise ValueError(f"{name} has shape {a.shape}; expected [{B}, {C}, T{', H' if extra else ''}] "
                                 "like the choices")
            return a.reshape(B * C, *a.shape[2:])

        out = self._encode(flat("input_ids", input_ids), flat("attention_mask", attention_mask),
                           flat("token_type_ids", token_type_ids), flat("position_ids", position_ids),
                           output_hidden_states, output_attentions, capture, labels,
                           inputs_embeds=flat("inputs_embeds", inputs_embeds, 1), head_mask=head_mask, patch=patch)
        logits = F.linear(out["pooler_output"], **self._params["classifier"]).reshape(B, C)  # [B, num_choices]
        loss = None if labels is None else cross_entropy(logits, class_labels("labels", labels, (B,), C))
        return self._finish(MultipleChoiceModelOutput(loss=loss, logits=logits, hidden_states=out["hidden_states"],
                                                      attentions=out["attentions"], captures=out["captures"]),
                            return_dict)


class BertForTokenClassification(_Classifier):
    """``logits`` [B, T, num_labels], one prediction per token; ``labels`` [B, T] (-100: not scored)."""

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                 output_hidden_states=None, output_attentions=None, return_dict=None, capture=None, inputs_embeds=None,
                head_mask=None, patch=None) -> TokenClassifierOutput:
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                           output_attentions, capture, labels, inputs_embeds=inputs_embeds,
                           head_mask=head_mask, patch=patch)
        logits = F.linear(out["last_hidden_state"], **self._params["classifier"])  # [B, T, num_labels]
        loss = None
        if labels is not None:
            loss = cross_entropy(logits, class_labels("labels", labels, logits.shape[:2], logits.shape[-1]))
        return self._finish(TokenClassifierOutput(loss=loss, logits=logits, hidden_states=out["hidden_states"],
                                                  attentions=out["attentions"], captures=out["captures"]), return_dict)


class BertForQuestionAnswering(_Classifier):
    """``start_logits`` and ``end_logits`` [B, T]: the answer span's first and last token.

    With ``start_positions`` and ``end_positions`` [B] the loss is the mean of the two
    cross-entropies; as in transformers, a position ≥ T (an answer outside this window) is not
    scored. A negative position is an error (transformers would clamp it to 0)."""

    head_name = "qa_outputs"

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 start_positions=None, end_positions=None, output_hidden_states=None, output_attentions=None,
                 return_dict=None, capture=None, inputs_embeds=None,
                head_mask=None, patch=None) -> QuestionAnsweringModelOutput:
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                           output_attentions, capture, start_positions, end_positions, inputs_embeds=inputs_embeds,
                           head_mask=head_mask, patch=patch)
        logits = F.linear(out["last_hidden_state"], **self._params["qa_outputs"])  # [B, T, 2]
        start, end = logits[..., 0], logits[..., 1]  # [B, T] each
        loss = None
        if (start_positions is None) != (end_positions is None):
            raise ValueError("the question-answering loss needs both start_positions and end_positions")
        if start_positions is not None:
            B, T = start.shape
            losses = []
            for name, pos, lg in (("start_positions", start_positions, start), ("end_positions", end_positions, end)):
                p = np.asarray(pos)
                if p.dtype.kind not in "iu":
                    raise TypeError(f"{name} has dtype {p.dtype}; expected integer token positions")
                if p.size != B:
                    raise ValueError(f"{name} has shape {p.shape}; expected [{B}]")
                p = p.reshape(B)
                if (p < 0).any():
                    raise ValueError(f"{name} contains {int(p[p < 0][0])}; expected a token position in [0, {T})")
                p = np.minimum(p, T)  # outside the window: ignored, as transformers does
                losses.append(cross_entropy(lg, p, ignore_index=T, what=name))
            loss = (losses[0] + losses[1]) / 2
        return self._finish(QuestionAnsweringModelOutput(
            loss=loss, start_logits=np.ascontiguousarray(start), end_logits=np.ascontiguousarray(end),
            hidden_states=out["hidden_states"], attentions=out["attentions"], captures=out["captures"]), return_dict)


TASK_MODELS = {
    cls.__name__: cls
    for cls in (BertForMaskedLM, BertForNextSentencePrediction, BertForPreTraining, BertForSequenceClassification,
                BertForTokenClassification, BertForQuestionAnswering)
}
