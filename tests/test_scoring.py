"""Label-trie scoring equals one forward pass per (prompt, label), with shared label prefixes."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

from medtune.scoring import LabelTrie, score_naive, score_tree

# token-id sequences: shared prefixes, a label that is a prefix of another, repeated tokens
LABELS = [[5, 6, 7, 2], [5, 6, 2], [5, 8, 2], [9, 2], [5, 6, 7, 7, 2]]


def test_trie_shares_prefixes_and_keeps_each_path():
    trie = LabelTrie.build(LABELS)
    assert len(trie.tokens) == 11 < sum(map(len, LABELS))  # 17 tokens, 11 nodes
    for lab, path in zip(LABELS, trie.paths, strict=True):
        assert [trie.tokens[n] for n in path] == lab
        assert [trie.depths[n] for n in path] == list(range(len(lab)))
        assert all(trie.parents[b] == a for a, b in itertools.pairwise(path))
    anc = trie.ancestors()
    leaf = trie.paths[4][-1]
    assert anc[leaf, trie.paths[4]].all() and anc[leaf].sum() == len(LABELS[4])


def test_trie_scores_equal_naive(tiny_base):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    prompts = [[1, 11, 12, 13, 14], [1, 20], [1, 30, 31, 32, 33, 34, 35, 36, 37]]  # unequal lengths
    got = score_tree(model, prompts, LABELS, pad_id=0)
    ref = score_naive(model, prompts, LABELS, pad_id=0)
    assert got.shape == (3, len(LABELS))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    # a single label and a single prompt
    torch.testing.assert_close(score_tree(model, prompts[:1], LABELS[:1], 0),
                               score_naive(model, prompts[:1], LABELS[:1], 0), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_shared_prompt_prefix_runs_once_and_changes_nothing(tiny_base_factory, arch, monkeypatch):
    import medtune.scoring as scoring

    model = AutoModelForCausalLM.from_pretrained(tiny_base_factory(arch)).eval()
    head = [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49]                # 11 tokens in every prompt
    prompts = [[*head, 11, 12, 13], [*head, 20], [*head, 30, 31, 32, 33, 34, 35]]
    shared, cache = scoring._prefix_cache(model, prompts, torch.device("cpu"))
    assert shared == len(head) and cache is not None
    assert scoring._prefix_cache(model, [head, head], torch.device("cpu"))[0] == len(head) - 1
    got = score_tree(model, prompts, LABELS, pad_id=0)
    torch.testing.assert_close(got, score_naive(model, prompts, LABELS, pad_id=0), atol=1e-4, rtol=0)
    monkeypatch.setattr(scoring, "MIN_SHARED", 10**6)                 # the path without a cache
    torch.testing.assert_close(got, score_tree(model, prompts, LABELS, pad_id=0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_prefix_memo_runs_each_prefix_once_and_changes_nothing(tiny_base_factory, arch,
                                                               monkeypatch):
    """Batches of one call share the common prefix's KV cache, computed once per distinct
    prefix; every score equals the un-memoised one."""
    import medtune.scoring as scoring

    model = AutoModelForCausalLM.from_pretrained(tiny_base_factory(arch)).eval()
    head = [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49]
    batches = [[[*head, 20], [*head, 30, 31]],                       # shared: head
               [[*head, 50, 51, 52, 11], [*head, 50, 51, 52, 12]],   # shared: head + 3 tokens
               [[*head, 60, 61], [*head, 70]]]                       # shared: head (known)
    decoder = scoring.decoder(model)
    calls: list[int] = []
    real = type(decoder).forward

    def counting(self, *args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return real(self, *args, **kwargs)

    plain = [score_tree(model, b, LABELS, pad_id=0) for b in batches]
    monkeypatch.setattr(type(decoder), "forward", counting)
    memo: dict = {}
    memoised = [score_tree(model, b, LABELS, pad_id=0, prefix_memo=memo) for b in batches]
    for a, b in zip(plain, memoised, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # prefix passes (batch 1) for the two distinct prefixes only; one scoring pass per batch
    assert calls == [1, 2, 1, 2, 2] and len(memo) == 2
    # the memo's caches are untouched by the batches that used them
    again = score_tree(model, batches[0], LABELS, pad_id=0, prefix_memo=memo)
    torch.testing.assert_close(again, plain[0], atol=1e-5, rtol=0)


def test_truncate_prompt_never_exceeds_its_limit():
    from medtune.scoring import truncate_prompt

    ids = list(range(100))
    assert truncate_prompt(ids, None) == ids and truncate_prompt(ids, 100) == ids
    assert truncate_prompt(ids, 40) == ids[:24] + ids[-16:]  # head, then the answer cue
    for limit in range(1, 100):  # limits under the 16-token tail used to make it longer
        cut = truncate_prompt(ids, limit)
        assert len(cut) == limit and cut[0] == 0, limit
        assert limit < 2 or cut[-1] == 99, limit


ARCH_CASES = {  # transformers config overrides on a tiny random model
    "granite-logits-scaling": ("granite", {"logits_scaling": 8.0}),
    "cohere-logit-scale": ("cohere", {"logit_scale": 0.0625}),
    "mistral-sliding-window": ("mistral", {"sliding_window": 4}),
    "gemma2-sliding-and-full": ("gemma2", {"sliding_window": 4, "head_dim": 16}),
    "gemma3-sliding-layers": ("gemma3_text", {"sliding_window": 4, "head_dim": 16}),
    "qwen2-mixed-layers": ("qwen2", {"sliding_window": 4, "use_sliding_window": True,
                                     "max_window_layers": 1}),
}


def _tiny_random(arch: str, extra: dict):
    from transformers import AutoConfig

    torch.manual_seed(0)
    config = AutoConfig.for_model(arch, vocab_size=128, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                                  pad_token_id=0, **extra)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("case", list(ARCH_CASES))
def test_scores_equal_naive_with_logit_scaling_and_sliding_windows(case):
    """Logit post-processing (was skipped: wrong temperature) and sliding windows shorter than
    the prompt (the custom mask attended to everything) score as the model's own forward."""
    from medtune.scoring import check_head

    model = _tiny_random(*ARCH_CASES[case])
    check_head(model)
    prompts = [[1, *range(11, 31)], [1, 20, 21, 22]]  # 21 tokens: far past a window of 4
    torch.testing.assert_close(score_tree(model, prompts, LABELS, pad_id=0),
                               score_naive(model, prompts, LABELS, pad_id=0), atol=1e-4, rtol=0)


def test_check_head_refuses_a_forward_that_changes_the_logits_otherwise(tiny_base):
    from medtune.errors import MedtuneError
    from medtune.scoring import check_head

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    check_head(model)
    forward = model.forward

    def doubled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out

    model.forward = doubled
    with pytest.raises(MedtuneError, match="post-processes the logits"):
        check_head(model)
