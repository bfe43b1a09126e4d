"""camex_vision.nlp: converting GPT-2 and T5, routing, generation, losses and persistence (tiny random configs)."""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip('transformers')
from transformers import (  # noqa: E402
    BertConfig, BertModel, DynamicCache, GPT2Config, GPT2DoubleHeadsModel, GPT2ForSequenceClassification,
    GPT2LMHeadModel, GPT2Model, T5Config, T5EncoderModel, T5ForConditionalGeneration, T5ForSequenceClassification,
    T5Model)

import camex_vision  # noqa: E402
from camex_vision.core import MergedLinear, MoEModule, Router  # noqa: E402
from camex_vision.nlp import (  # noqa: E402
    RoutedCAMExGatedMlp, RoutedCAMExMlp, StackRouting, camex_options, camexify, from_pretrained,
    init_experts_independently, is_camexified, reparameterize)

VOCAB, PAD, BOS, EOS = 64, 0, 1, 2


pytestmark = pytest.mark.usefixtures('one_thread')


def gpt2_config(**kw) -> GPT2Config:
    return GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=BOS,
                      eos_token_id=EOS, pad_token_id=PAD, **kw)


def t5_config(gated: bool = False, **kw) -> T5Config:
    return T5Config(d_model=32, d_ff=48, num_layers=2, num_heads=2, d_kv=16, vocab_size=VOCAB, pad_token_id=PAD,
                    eos_token_id=EOS, decoder_start_token_id=PAD, feed_forward_proj='gated-gelu' if gated else 'relu',
                    **kw)


def make(cls, gated: bool = False, seed: int = 0, **kw):
    torch.manual_seed(seed)
    config = gpt2_config(**kw) if cls.__name__.startswith('GPT2') else t5_config(gated, **kw)
    return cls(config).eval()


def perturb(model, seed: int = 1) -> None:
    """Make experts differ and routers decisive, so that routing changes outputs (upcycled experts are equal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MergedLinear):
                m.weight_experts.add_(torch.randn(m.weight_experts.shape, generator=g) * 0.2)
            elif isinstance(m, Router):
                m.gate.weight.copy_(torch.randn(m.gate.weight.shape, generator=g))
        for name, p in model.named_parameters():
            if name.endswith('.prior'):
                p.copy_(torch.randn(p.shape, generator=g))


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def inputs_for(model, batch: int = 2, length: int = 11):
    """Forward kwargs with a right-padded second row (and one <eos> per row for T5 classification)."""
    ids = tokens(batch, length)
    mask = torch.ones_like(ids)
    mask[1, length - 3:] = 0
    ids[1, length - 3:] = PAD
    if isinstance(model, T5ForSequenceClassification):
        ids[0, -1] = EOS
        ids[1, length - 4] = EOS
    kw = {'input_ids': ids, 'attention_mask': mask}
    if isinstance(model, (T5ForConditionalGeneration, T5Model)):
        kw['decoder_input_ids'] = tokens(batch, 7, seed=1)
    return kw


def output(model, kw):
    out = model(**kw)
    return out.logits if hasattr(out, 'logits') else out.last_hidden_state


CASES = [
    (GPT2LMHeadModel, False), (GPT2ForSequenceClassification, False), (GPT2Model, False),
    (T5ForConditionalGeneration, False), (T5ForConditionalGeneration, True), (T5EncoderModel, False),
    (T5EncoderModel, True), (T5ForSequenceClassification, False), (T5ForSequenceClassification, True),
    (T5Model, True)]


@pytest.mark.parametrize('cls,gated', CASES, ids=[f'{c.__name__}{"-gated" if g else ""}' for c, g in CASES])
def test_upcycling_is_exact(cls, gated):
    model = make(cls, gated)
    kw = inputs_for(model)
    with torch.no_grad():
        dense = output(model, kw)
        camexify(model, num_experts=4, segment_length=4)
        moe = output(model, kw)
    torch.testing.assert_close(moe, dense, atol=1e-4, rtol=0)
    ffn_type = RoutedCAMExGatedMlp if gated else RoutedCAMExMlp
    ffns = [m for m in model.modules() if isinstance(m, MoEModule)]
    assert ffns and all(type(m) is ffn_type for m in ffns)
    n_stacks = 2 if cls in (T5ForConditionalGeneration, T5ForSequenceClassification, T5Model) else 1
    assert len(ffns) == 2 * n_stacks


OPTIONS = [
    dict(dynamic=True), dict(dynamic=True, alpha=0.7), dict(alpha=0.5, merge='euclidean'), dict(mask='dare'),
    dict(mask=None, kron_rank=2), dict(router_per='linear', top_k=2), dict(first_segment='own'),
    dict(first_segment='uniform', density=0.5)]


@pytest.mark.parametrize('options', OPTIONS, ids=lambda o: ','.join(f'{k}={v}' for k, v in o.items()))
@pytest.mark.parametrize('cls,gated', [(GPT2LMHeadModel, False), (T5ForConditionalGeneration, True)],
                         ids=['gpt2', 't5-gated'])
def test_upcycling_is_exact_for_every_option(cls, gated, options):
    model = make(cls, gated)
    kw = inputs_for(model)
    with torch.no_grad():
        dense = output(model, kw)
        camexify(model, num_experts=4, segment_length=4, **options)
        torch.testing.assert_close(output(model, kw), dense, atol=1e-4, rtol=0)
    recorded = camex_options(model)
    assert {k: recorded[k] for k in options} == options and recorded['reparameterized'] is False


def test_independent_expert_init_for_training_from_scratch():
    model = make(T5ForConditionalGeneration, gated=True)
    camexify(model, num_experts=4, dynamic=True)
    layers = [m for m in model.modules() if isinstance(m, MergedLinear)]
    dense = [(m.weight_experts[0].clone(), None if m.weight_base is None else m.weight_base.clone()) for m in layers]
    init_experts_independently(model, torch.Generator().manual_seed(0))
    for layer, (w, base) in zip(layers, dense):
        experts = layer.weight_experts
        assert not torch.allclose(experts[0], experts[1])
        assert experts.std().item() == pytest.approx(w.std().item(), rel=0.2)
        assert base is None or torch.equal(layer.weight_base, base)


def test_conversion_keeps_training_mode_and_dropout():
    model = make(GPT2LMHeadModel).train()
    camexify(model, num_experts=3)
    ffn = model.transformer.h[0].mlp
    assert ffn.training and ffn.drop2.p == model.config.resid_pdrop and ffn.drop1.p == 0.


def _no_lookahead(model, batch: int, length: int, ts, decoder: bool = False):
    ids = tokens(batch, length)
    with torch.no_grad():
        for t in ts:
            changed = ids.clone()
            changed[:, t + 1:] = tokens(batch, length - t - 1, seed=t + 7)
            if decoder:
                enc = tokens(batch, 5, seed=3)
                a = model(input_ids=enc, decoder_input_ids=ids).logits
                b = model(input_ids=enc, decoder_input_ids=changed).logits
            else:
                a, b = model(ids).logits, model(changed).logits
            yield t, a, b


@pytest.mark.parametrize('first_segment', ['prior', 'uniform'])
def test_gpt2_has_no_lookahead_across_segments(first_segment):
    model = make(GPT2LMHeadModel)
    camexify(model, num_experts=4, segment_length=4, first_segment=first_segment)
    perturb(model)
    for t, a, b in _no_lookahead(model, 2, 15, ts=(0, 2, 3, 5, 8, 12)):
        torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], atol=1e-6, rtol=0, msg=f'look-ahead at t={t}')
        assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


def test_own_first_segment_leaks_only_inside_the_first_segment():
    model = make(GPT2LMHeadModel)
    camexify(model, num_experts=4, segment_length=4, first_segment='own')
    perturb(model)
    results = dict((t, (a, b)) for t, a, b in _no_lookahead(model, 2, 13, ts=(1, 5, 9)))
    a, b = results[1]
    assert not torch.allclose(a[:, :2], b[:, :2], atol=1e-6)  # the paper's behaviour: segment 1 sees its own mean
    for t in (5, 9):
        a, b = results[t]
        torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], atol=1e-6, rtol=0)


def test_t5_decoder_has_no_lookahead():
    model = make(T5ForConditionalGeneration, gated=True)
    camexify(model, num_experts=4, segment_length=3)
    perturb(model)
    for t, a, b in _no_lookahead(model, 2, 11, ts=(0, 2, 4, 7), decoder=True):
        torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], atol=1e-6, rtol=0, msg=f'look-ahead at t={t}')


def _greedy_matches_full_forward(model, prompt, new_tokens, **gen):
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, **gen)
    steps = torch.stack(out.logits, 1)
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            full = model(input_ids=prompt, decoder_input_ids=out.sequences, **gen).logits[:, :-1]
            new = out.sequences[:, 1:]
        else:
            full = model(out.sequences, **gen).logits[:, prompt.shape[1] - 1:-1]
            new = out.sequences[:, prompt.shape[1]:]
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)
    assert torch.equal(steps.argmax(-1), new)
    return out


@pytest.mark.parametrize('options', [dict(), dict(router_per='linear', first_segment='uniform'),
                                     dict(dynamic=True, kron_rank=2)], ids=['default', 'linear-uniform', 'dynamic'])
def test_gpt2_greedy_generation_matches_full_forward(options):
    model = make(GPT2LMHeadModel)
    camexify(model, num_experts=4, segment_length=4, **options)
    perturb(model)
    _greedy_matches_full_forward(model, tokens(2, 6), 13)  # crosses segment boundaries at 8, 12, 16


def test_t5_greedy_generation_matches_full_forward():
    model = make(T5ForConditionalGeneration, gated=True)
    camexify(model, num_experts=4, segment_length=3)
    perturb(model)
    prompt = tokens(2, 8)
    mask = torch.ones_like(prompt)
    mask[1, 5:] = 0  # a padded source sentence
    _greedy_matches_full_forward(model, prompt, 10, attention_mask=mask)


def test_incremental_chunks_reproduce_full_forward():
    model = make(GPT2LMHeadModel)
    camexify(model, num_experts=4, segment_length=4)
    perturb(model)
    ids = tokens(2, 17)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :3], use_cache=True)  # the model creates the cache: routing state attached afterwards
        parts = [out.logits]
        for start, stop in ((3, 9), (9, 10), (10, 17)):
            out = model(ids[:, start:stop], cache=out.cache, use_cache=True)
            parts.append(out.logits)
        cache = DynamicCache(config=model.config)  # a cache passed in from the start
        one = [model(ids[:, i:i + 1], cache=cache, use_cache=True).logits for i in range(17)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(one, 1), full, atol=1e-5, rtol=0)


def test_beam_search_reorders_the_routing_state():
    model = make(GPT2LMHeadModel)
    camexify(model, num_experts=4, segment_length=4)
    perturb(model)
    prompt = tokens(2, 5)
    out = model.generate(prompt, max_new_tokens=9, min_new_tokens=9, num_beams=3, do_sample=False,
                         length_penalty=0.0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        logp = torch.log_softmax(model(out.sequences).logits, -1)
    scores = logp[:, 4:-1].gather(-1, out.sequences[:, 5:, None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(out.sequences_scores, scores, atol=1e-4, rtol=0)


def test_left_padded_generation_is_rejected():
    model = make(GPT2LMHeadModel)
    camexify(model, num_experts=4, segment_length=4)
    prompt = tokens(2, 6)
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    with pytest.raises(ValueError, match='left padding'):
        model.generate(prompt, attention_mask=mask, max_new_tokens=3, do_sample=False)


def test_cache_the_model_did_not_fill_is_rejected():
    model = make(GPT2LMHeadModel)
    dense = copy.deepcopy(model)
    camexify(model, num_experts=4, segment_length=4)
    ids = tokens(1, 6)
    with torch.no_grad():
        foreign = dense(ids, use_cache=True).cache
        with pytest.raises(ValueError, match='did not process'):
            model(ids[:, :1], cache=foreign, use_cache=True)
        cache = model(ids, use_cache=True).cache
        cache.crop(-2)
        with pytest.raises(ValueError, match='cropped'):
            model(ids[:, 4:5], cache=cache, use_cache=True)


def test_sequence_routing_cannot_decode_incrementally():
    model = make(GPT2ForSequenceClassification)
    camexify(model, num_experts=4, segment_length=None)
    ids = tokens(1, 6)
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
        with pytest.raises(ValueError, match='token by\\s+token'):
            model(ids[:, :1], cache=cache, use_cache=True)


@pytest.mark.parametrize('cls', [T5EncoderModel, T5ForConditionalGeneration, T5ForSequenceClassification])
def test_t5_routing_ignores_padding(cls, monkeypatch):
    model = make(cls, gated=True)
    camexify(model, num_experts=4, segment_length=3)
    perturb(model)
    short, long = tokens(1, 6, seed=4), tokens(1, 9, seed=5)
    short[0, -1] = long[0, -1] = EOS
    padded = torch.cat([torch.cat([short, torch.full((1, 3), PAD)], 1), long])
    mask = (torch.arange(9) < torch.tensor([[6], [9]])).long()
    extra = {}
    if cls is T5ForConditionalGeneration:
        extra = {'decoder_input_ids': tokens(2, 4, seed=6)}
    with torch.no_grad():
        batch = output(model, {'input_ids': padded, 'attention_mask': mask, **extra})
        alone = output(model, {'input_ids': short, **{k: v[:1] for k, v in extra.items()}})
        # control: attention still masks the padding, but routing pools over it (as the authors' code does)
        monkeypatch.setattr(StackRouting, '_current_mask', lambda self, mask, batch, length: None)
        pooled_padding = output(model, {'input_ids': padded, 'attention_mask': mask, **extra})
    if cls is T5EncoderModel:
        batch, alone, pooled_padding = batch[:, :6], alone[:, :6], pooled_padding[:, :6]
    torch.testing.assert_close(batch[:1], alone, atol=1e-5, rtol=0)
    assert not torch.allclose(pooled_padding[:1], alone, atol=1e-4)


@pytest.mark.parametrize('segment_length', [None, 4])
def test_gpt2_classification_ignores_right_padding(segment_length):
    model = make(GPT2ForSequenceClassification)
    camexify(model, num_experts=4, segment_length=segment_length)
    perturb(model)
    short = tokens(1, 6, seed=4)
    padded = torch.cat([short, torch.full((1, 4), PAD)], 1)
    mask = (padded != PAD).long()
    with torch.no_grad():
        torch.testing.assert_close(model(padded, attention_mask=mask).logits, model(short).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize('cls,gated', [(GPT2LMHeadModel, False), (T5ForConditionalGeneration, True),
                                       (T5ForSequenceClassification, False), (GPT2ForSequenceClassification, False)])
def test_loss_includes_the_balance_loss(cls, gated):
    model = make(cls, gated).train()
    camexify(model, num_experts=4, segment_length=4, balance_coef=0.5)
    kw = inputs_for(model)
    if cls is GPT2LMHeadModel:
        labels = kw['input_ids'].masked_fill(kw['attention_mask'] == 0, -100)
    elif cls is T5ForConditionalGeneration:
        labels = tokens(2, 5, seed=9)
        kw.pop('decoder_input_ids')
    else:
        labels = torch.tensor([0, 1])
    torch.manual_seed(0)
    out = model(**kw, labels=labels)
    aux = camex_vision.aux_loss(model)
    assert aux.item() > 0 and aux.requires_grad
    if cls is GPT2LMHeadModel:
        ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    elif cls is T5ForConditionalGeneration:
        ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten())
    else:
        ce = torch.nn.functional.cross_entropy(out.logits, labels)
    torch.testing.assert_close(out.loss, ce + aux)
    torch.manual_seed(0)
    as_tuple = model(**kw, labels=labels, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.loss)
    no_labels = dict(kw, decoder_input_ids=labels) if cls is T5ForConditionalGeneration else kw
    assert model(**no_labels).loss is None


def test_balance_losses_of_a_stack_that_did_not_run_are_not_added():
    model = make(T5ForConditionalGeneration).train()
    camexify(model, num_experts=4, segment_length=4, balance_coef=0.5)
    kw = inputs_for(model)
    encoder_outputs = model.get_encoder()(input_ids=kw['input_ids'], attention_mask=kw['attention_mask'])
    out = model(encoder_outputs=encoder_outputs, attention_mask=kw['attention_mask'], labels=tokens(2, 5))
    encoder_ffns = [m for m in model.encoder.modules() if isinstance(m, MoEModule)]
    assert all(m.last_aux_loss is None for m in encoder_ffns)
    out.loss.backward()  # no stale graph from the encoder call


@pytest.mark.parametrize('cls,gated,options', [(GPT2LMHeadModel, False, dict(dynamic=True)),
                                               (T5ForConditionalGeneration, True, dict(router_per='linear'))])
def test_every_parameter_receives_a_gradient(cls, gated, options):
    model = make(cls, gated).train()
    camexify(model, num_experts=4, segment_length=4, **options)
    kw = inputs_for(model)
    labels = kw['input_ids'] if cls is GPT2LMHeadModel else tokens(2, 7)
    kw.pop('decoder_input_ids', None)
    model(**kw, labels=labels).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize('cls,gated', [(GPT2LMHeadModel, False), (T5ForConditionalGeneration, True)])
def test_gradient_checkpointing_gives_the_same_gradients(cls, gated):
    # the recomputation in backward must route with the same padding mask as the forward pass
    grads = []
    for checkpointing in (False, True):
        model = make(cls, gated, **({'resid_pdrop': 0., 'embd_pdrop': 0., 'attn_pdrop': 0.} if not gated
                                     else {'dropout_rate': 0.}))
        camexify(model, num_experts=4, segment_length=4, router_noise=False)
        perturb(model)
        model.train()
        if checkpointing:
            getattr(model, 'activation_checkpointing_enable', model.gradient_checkpointing_enable)()
        calls, ffn = [], next(m for m in model.modules() if isinstance(m, MoEModule))
        read_inputs = ffn.routing.inputs
        ffn.routing.inputs = lambda index, x: (calls.append(index), read_inputs(index, x))[1]
        kw = inputs_for(model)
        labels = kw['input_ids'] if cls is GPT2LMHeadModel else tokens(2, 7)
        kw.pop('decoder_input_ids', None)
        model(**kw, labels=labels).loss.backward()
        assert calls.count(0) == 1 + checkpointing  # the block was recomputed in backward
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize('cls,gated,options', [
    (GPT2LMHeadModel, False, dict(dynamic=True, alpha=0.8)), (GPT2ForSequenceClassification, False, dict()),
    (T5ForConditionalGeneration, True, dict(mask='dare', kron_rank=2)), (T5EncoderModel, False, dict())])
def test_save_pretrained_and_from_pretrained_round_trip(tmp_path, cls, gated, options):
    model = make(cls, gated)
    camexify(model, num_experts=4, segment_length=4, **options)
    perturb(model)
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path)
    assert type(loaded) is cls and is_camexified(loaded) and not loaded.training
    assert camex_options(loaded) == camex_options(model)
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    kw = inputs_for(model)
    with torch.no_grad():
        assert torch.equal(output(loaded, kw), output(model, kw))
    if cls is GPT2LMHeadModel:
        _greedy_matches_full_forward(loaded, tokens(1, 5), 6)


@pytest.mark.parametrize('cls,gated,options', [(GPT2LMHeadModel, False, dict(dynamic=True, alpha=0.8)),
                                               (T5ForConditionalGeneration, True, dict(kron_rank=2))])
def test_reparameterize_round_trip(tmp_path, cls, gated, options):
    model = make(cls, gated)
    camexify(model, num_experts=4, segment_length=4, **options)
    perturb(model)
    with torch.no_grad():  # train the curvature a little away from identity
        for m in model.modules():
            if isinstance(m, MergedLinear) and m.curvature is not None:
                for p in m.curvature.parameters():
                    p.add_(torch.randn_like(p) * 0.05)
    kw = inputs_for(model)
    with torch.no_grad():
        before = output(model, kw)
        camex_vision.reparameterize(model)  # the core function, as for vision models
        after = output(model, kw)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert all(m.curvature is None and m.owns_base for m in model.modules() if isinstance(m, MergedLinear))
    model.save_pretrained(tmp_path / 'core')  # config not flagged: the loader sees the folded weights
    with torch.no_grad():
        assert torch.equal(output(from_pretrained(tmp_path / 'core'), kw), after)
    reparameterize(model)  # the language-model helper records the fold in the config
    assert camex_options(model)['reparameterized'] is True
    model.save_pretrained(tmp_path / 'nlp')
    with torch.no_grad():
        assert torch.equal(output(from_pretrained(tmp_path / 'nlp'), kw), after)


def test_folded_euclidean_ties_reloads_exactly(tmp_path):
    model = make(GPT2LMHeadModel)
    camexify(model, num_experts=4, merge='euclidean', alpha=0.6, density=0.5)
    perturb(model)
    kw = inputs_for(model)
    with torch.no_grad():
        before = output(model, kw)
        reparameterize(model)
        model.save_pretrained(tmp_path)
        torch.testing.assert_close(output(from_pretrained(tmp_path), kw), before, atol=1e-5, rtol=0)


def test_deepcopy_gets_its_own_routing_state():
    model = make(GPT2LMHeadModel)
    camexify(model, num_experts=4, segment_length=4)
    perturb(model)
    twin = copy.deepcopy(model)
    assert twin.transformer.h[0].mlp.routing is not model.transformer.h[0].mlp.routing
    assert twin.transformer.h[0].mlp.routing is twin.transformer.h[1].mlp.routing
    _greedy_matches_full_forward(twin, tokens(1, 5), 6)


# ---- bad input ----

def test_unsupported_architectures_are_rejected():
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(TypeError, match='BertModel'):
        camexify(bert)
    with pytest.raises(TypeError, match='GPT2DoubleHeadsModel'):
        camexify(GPT2DoubleHeadsModel(gpt2_config()))


def test_a_foreign_ffn_is_rejected_before_any_change():
    model = make(GPT2LMHeadModel)
    model.transformer.h[1].mlp = torch.nn.Identity()
    with pytest.raises(TypeError, match=r'transformer\.h\.1\.mlp is a Identity'):
        camexify(model)
    assert not any(isinstance(m, MoEModule) for m in model.modules())


def test_converting_twice_is_rejected():
    model = make(GPT2LMHeadModel)
    camexify(model, num_experts=3)
    with pytest.raises(ValueError, match='already converted'):
        camexify(model, num_experts=3)


@pytest.mark.parametrize('value', [0, -4, 2.5, True])
def test_bad_segment_length_is_rejected_before_any_change(value):
    model = make(GPT2LMHeadModel)
    with pytest.raises(ValueError, match='segment_length'):
        camexify(model, segment_length=value)
    assert not is_camexified(model) and not any(isinstance(m, MoEModule) for m in model.modules())


def test_sequence_routing_is_rejected_for_generating_models():
    with pytest.raises(ValueError, match='segment_length=None'):
        camexify(make(GPT2LMHeadModel), segment_length=None)
    with pytest.raises(ValueError, match='segment_length=None'):
        camexify(make(T5ForConditionalGeneration), segment_length=None)


def test_bad_core_option_is_rejected_before_any_change():
    model = make(T5ForConditionalGeneration)
    with pytest.raises(ValueError, match='router_per'):
        camexify(model, router_per='block')
    with pytest.raises(ValueError, match='first_segment'):
        camexify(model, first_segment='last')
    assert not any(isinstance(m, MoEModule) for m in model.modules())


def test_from_pretrained_rejects_a_dense_checkpoint(tmp_path):
    make(GPT2LMHeadModel).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match='dense model'):
        from_pretrained(tmp_path)


def test_importing_camex_vision_does_not_import_transformers():
    code = 'import sys, camex_vision; assert "transformers" not in sys.modules, "transformers imported"'
    subprocess.run([sys.executable, '-c', code], check=True)


def test_docs_example_runs(tmp_path, monkeypatch, capsys):
    doc = Path(__file__).resolve().parents[1] / 'docs' / 'nlp.md'
    if not doc.exists():
        pytest.skip('docs/nlp.md not present')
    code = doc.read_text(encoding='utf-8').split('```python\n', 1)[1].split('```', 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(doc), 'exec'), {'__name__': '__doc_example__'})
    assert 'loss' in capsys.readouterr().out and (tmp_path / 'camex-gpt2' / 'config.json').exists()
