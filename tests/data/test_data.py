"""gil_megatron.data: formats, errors, tokenization policy, resumable sampling, DP sharding."""

import json
import logging

import pytest
import torch

from gil_megatron.data import (
    DataError,
    DataLoader,
    DistributedBatchSampler,
    eval_batches,
    load_preferences,
    load_prompts,
    load_sft,
    pad_token_id,
    read_records,
    split_hh_dialogue,
)
from gil_megatron.miniature.tokenizer import save_tokenizer

HH_ONE = "\n\nHuman: a b\n\nAssistant: c d"
HH_TWO = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c d\n\nAssistant: e f g"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(save_tokenizer(str(tmp_path_factory.mktemp("tok"))))


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# --- formats ----------------------------------------------------------------------------------


def test_prompts_jsonl_with_and_without_group(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "COPY a b =", "group": "copy"}, "",
                                             {"prompt": "SORT b a =", "extra": 1}])
    ds = load_prompts(path, tok, max_prompt_length=10)
    assert len(ds) == 2 and ds.dropped == 0
    assert ds.prompt_ids[0] == [tok.bos_token_id] + ids(tok, "COPY a b =")
    assert ds.prompts == ["COPY a b =", "SORT b a ="]
    assert ds.groups == ["copy", None] and ds.group_names() == ["copy"]


def test_bos_is_never_doubled_and_can_be_disabled(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "<bos> COPY a ="}])
    assert load_prompts(path, tok, max_prompt_length=10).prompt_ids[0] == [tok.bos_token_id] + ids(tok, "COPY a =")
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "COPY a ="}])
    assert load_prompts(path, tok, max_prompt_length=10, add_bos=False).prompt_ids[0] == ids(tok, "COPY a =")


def test_sft_formats_and_response_mask(tok, tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [
        {"prompt": "COPY a b =", "response": "a b", "group": "copy"},
        {"prompt": "REV a b =", "chosen": "b a", "rejected": "a b"},  # preference record: chosen used
        {"chosen": HH_ONE},  # HH-RLHF dialogue
    ])
    ds = load_sft(path, tok, max_length=16)
    eos, bos = tok.eos_token_id, tok.bos_token_id
    assert ds.response_ids[0] == ids(tok, "a b") + [eos]
    assert ds.response_ids[1] == ids(tok, "b a") + [eos]
    assert ds.prompt_ids[2] == [bos] + ids(tok, "\n\nHuman: a b\n\nAssistant:")
    assert ds.response_ids[2] == ids(tok, " c d") + [eos]
    batch = ds.collate([0, 2], pad_token_id(tok))
    p0, r0 = len(ds.prompt_ids[0]), len(ds.response_ids[0])
    assert batch.input_ids.shape == (2, max(batch.lengths.tolist()))
    assert batch.lengths[0] == p0 + r0 and batch.prompt_lengths[0] == p0
    assert batch.response_mask[0].tolist() == [False] * p0 + [True] * r0 + [False] * (batch.input_ids.shape[1] - p0 - r0)
    assert batch.input_ids[0, p0 + r0:].eq(tok.pad_token_id).all()
    assert batch.groups == ["copy", None] and batch.valid.all()


def test_preference_formats(tok, tmp_path):
    hh_rejected = "\n\nHuman: a b\n\nAssistant: idk"
    path = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "REV a b =", "chosen": "b a", "rejected": "idk", "group": "reverse"},
        {"chosen": HH_ONE, "rejected": hh_rejected},
    ])
    ds = load_preferences(path, tok, max_length=16)
    assert ds.chosen_ids[0] == ids(tok, "b a") + [tok.eos_token_id]
    assert ds.rejected_ids[1] == ids(tok, " idk") + [tok.eos_token_id]
    assert ds.prompt_ids[1] == [tok.bos_token_id] + ids(tok, "\n\nHuman: a b\n\nAssistant:")
    batch = ds.collate([0, 1], pad_token_id(tok))
    assert batch.chosen.prompt_lengths.tolist() == batch.rejected.prompt_lengths.tolist()
    row = batch.rejected.input_ids[0, : batch.rejected.lengths[0]].tolist()
    assert row == ds.prompt_ids[0] + ds.rejected_ids[0]
    assert batch.groups == ["reverse", None]


def test_prompts_from_hh_dialogues(tok, tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_TWO, "rejected": HH_TWO + " h"}])
    ds = load_prompts(path, tok, max_prompt_length=64)
    assert ds.prompts == ["\n\nHuman: a\n\nAssistant: b\n\nHuman: c d\n\nAssistant:"]


def test_hh_split_at_last_assistant_turn():
    assert split_hh_dialogue(HH_ONE) == ("\n\nHuman: a b\n\nAssistant:", " c d")
    prompt, response = split_hh_dialogue(HH_TWO)
    assert prompt == "\n\nHuman: a\n\nAssistant: b\n\nHuman: c d\n\nAssistant:" and response == " e f g"
    assert split_hh_dialogue("\n\nHuman: hi\n\nAssistant:") == ("\n\nHuman: hi\n\nAssistant:", "")
    with pytest.raises(DataError, match=r"f.jsonl: line 4: no '\\n\\nAssistant:' turn"):
        split_hh_dialogue("\n\nHuman: hi", where="f.jsonl: line 4")


def test_saved_hf_dataset_and_dataset_dict(tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": "COPY a =", "group": "copy"}, {"prompt": "SORT b a =", "group": "sort"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    ds = load_prompts(str(tmp_path / "ds"), tok, max_prompt_length=10)
    assert ds.prompts == ["COPY a =", "SORT b a ="] and ds.groups == ["copy", "sort"]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                               "test": datasets.Dataset.from_list([{"prompt": "REV a b c d e f g h ="}])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_prompts(str(tmp_path / "dd"), tok, max_prompt_length=10, split="train").prompts == ds.prompts
    with pytest.raises(DataError, match=r"splits \['test', 'train'\] and no split given; fix: pass split="):
        load_prompts(str(tmp_path / "dd"), tok, max_prompt_length=10)
    with pytest.raises(DataError, match=r"dd\[test\]: row 0: prompt is 11 tokens, longer than max_prompt_length=10"):
        load_prompts(str(tmp_path / "dd"), tok, max_prompt_length=10, split="test")


# --- errors -------------------------------------------------------------------------------------


def _one_line(err):
    msg = str(err.value)
    assert "\n" not in msg.replace("\\n", "") and "fix:" in msg
    return msg


def test_missing_and_empty_sources(tok, tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file or directory; fix:") as e:
        load_prompts(str(tmp_path / "nope.jsonl"), tok, max_prompt_length=8)
    _one_line(e)
    for text in ("", "\n  \n"):
        (tmp_path / "empty.jsonl").write_text(text)
        with pytest.raises(DataError, match=r"empty.jsonl: no records \(the file is empty\)") as e:
            read_records(str(tmp_path / "empty.jsonl"))
        _one_line(e)
    (tmp_path / "somedir").mkdir()
    with pytest.raises(DataError, match="somedir: directory is not a saved Hugging Face dataset") as e:
        read_records(str(tmp_path / "somedir"))
    _one_line(e)


@pytest.mark.parametrize(
    "line, pattern",
    [
        ('{"prompt": "COPY a =",}', r"bad.jsonl: line 3: not valid JSON \(.* at column \d+\); fix: each line"),
        ('["COPY a ="]', r"bad.jsonl: line 3: expected a JSON object, got list"),
        ('{"text": "COPY a ="}', r"bad.jsonl: line 3: missing field 'prompt' \(fields present: \['text'\]\); fix:"),
        ('{"prompt": 7}', r"bad.jsonl: line 3: field 'prompt' must be a str \(as on line 1\), got int; fix:"),
        ('{"prompt": "  "}', r"bad.jsonl: line 3: field 'prompt' is empty; fix:"),
        ('{"prompt": "COPY a =", "group": 2}', r"bad.jsonl: line 3: field 'group' must be a string or null, got int"),
        ('{"chosen": "no turns here"}', r"bad.jsonl: line 3: field 'chosen': no '\\n\\nAssistant:' turn"),
    ],
)
def test_prompt_record_errors_name_file_line_field(tok, tmp_path, line, pattern):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "COPY a ="}, "", line])
    with pytest.raises(DataError, match=pattern) as e:
        load_prompts(path, tok, max_prompt_length=8)
    _one_line(e)


def test_sft_and_preference_record_errors(tok, tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "COPY a ="}])
    with pytest.raises(DataError, match=r"s.jsonl: no column 'prompt'\+'response' or 'prompt'\+'chosen' or "
                                        r"'chosen' \(columns: \['prompt'\]\); fix: rename the columns or set data.keys"):
        load_sft(path, tok, max_length=16)
    path = write_jsonl(tmp_path / "s2.jsonl", [{"prompt": "COPY a =", "response": "a"}, {"prompt": "COPY b ="}])
    with pytest.raises(DataError, match=r"s2.jsonl: line 2: missing field 'response' \(fields present: \['prompt'\]\)"):
        load_sft(path, tok, max_length=16)
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "COPY a =", "chosen": "a", "rejected": "b"},
                                              {"prompt": "COPY a =", "chosen": "a"}])
    with pytest.raises(DataError, match=r"r.jsonl: line 2: missing field 'rejected'"):
        load_preferences(path, tok, max_length=16)
    path = write_jsonl(tmp_path / "h.jsonl", [{"chosen": HH_ONE, "rejected": HH_TWO}])
    with pytest.raises(DataError, match=r"h.jsonl: line 1: 'chosen' and 'rejected' dialogues differ") as e:
        load_preferences(path, tok, max_length=64)
    _one_line(e)


def test_too_long_is_an_error_by_default_and_dropped_on_request(tok, tmp_path, caplog):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "COPY a ="}, {"prompt": "COPY a b c d e f g ="}])
    with pytest.raises(DataError, match=r"long.jsonl: line 2: prompt is 10 tokens, longer than "
                                        r"max_prompt_length=8; fix: raise max_prompt_length or pass too_long='drop'") as e:
        load_prompts(path, tok, max_prompt_length=8)
    _one_line(e)
    with caplog.at_level(logging.WARNING, logger="gil_megatron.data"):
        ds = load_prompts(path, tok, max_prompt_length=8, too_long="drop")
    assert len(ds) == 1 and ds.dropped == 1 and "dropped 1 of 2 records" in caplog.text
    with pytest.raises(DataError, match="every record was dropped as too long"):
        load_prompts(path, tok, max_prompt_length=2, too_long="drop")
    sft = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "COPY a b =", "response": "a b"}])
    with pytest.raises(DataError, match=r"line 1: prompt \+ response is 8 tokens, longer than max_length=7"):
        load_sft(sft, tok, max_length=7)
    assert len(load_sft(sft, tok, max_length=8)) == 1
    pairs = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "COPY a b =", "chosen": "a b", "rejected": "a b c"}])
    with pytest.raises(DataError, match=r"prompt \+ response is 9 tokens, longer than max_length=8"):
        load_preferences(pairs, tok, max_length=8)
    with pytest.raises(ValueError, match="too_long must be 'error' or 'drop'"):
        load_prompts(path, tok, max_prompt_length=8, too_long="truncate")


# --- sampling, resume, sharding ------------------------------------------------------------------


def test_sampler_epochs_are_seeded_permutations_without_partial_batches():
    s = DistributedBatchSampler(10, 4, seed=7)
    assert s.batches_per_epoch == 2
    epoch0 = s.next_global_batch() + s.next_global_batch()
    epoch1 = s.next_global_batch()
    assert s.epoch == 1 and len(set(epoch0)) == 8 and len(epoch1) == 4
    again = DistributedBatchSampler(10, 4, seed=7)
    assert again.next_global_batch() + again.next_global_batch() == epoch0
    other = DistributedBatchSampler(10, 4, seed=8)
    assert other.next_global_batch() + other.next_global_batch() != epoch0
    ordered = DistributedBatchSampler(10, 4, seed=7, shuffle=False)
    assert ordered.next_global_batch() == [0, 1, 2, 3]
    with pytest.raises(DataError, match="dataset has 3 records, fewer than global_batch_size=4"):
        DistributedBatchSampler(3, 4, seed=0)
    with pytest.raises(ValueError, match="global_batch_size=6 must be a positive multiple of dp_size=4"):
        DistributedBatchSampler(10, 6, seed=0, dp_size=4)


def test_cursor_save_and_restore_resumes_exactly(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"COPY {' '.join('abcdefg'[: 1 + i % 7])} ="} for i in range(13)])
    ds = load_prompts(path, tok, max_prompt_length=10)
    loader = DataLoader(ds, 4, seed=1, pad_token_id=pad_token_id(tok))
    for _ in range(4):  # crosses an epoch boundary (3 batches per epoch)
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))  # survives a JSON checkpoint
    assert (state["epoch"], state["position"]) == (1, 4)
    expected = [loader.next_batch() for _ in range(5)]
    resumed = DataLoader(ds, 4, seed=1, pad_token_id=pad_token_id(tok))
    resumed.load_state_dict(state)
    for want, got in zip(expected, (resumed.next_batch() for _ in range(5))):
        assert got.indices == want.indices and torch.equal(got.input_ids, want.input_ids)
    bigger = DataLoader(ds, 2, seed=1, pad_token_id=0)
    with pytest.raises(DataError, match="checkpoint has global_batch_size=4, this run has global_batch_size=2"):
        bigger.load_state_dict(state)


def test_dp_shards_partition_each_global_batch(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "COPY a =", "group": f"g{i}"} for i in range(24)])
    ds = load_prompts(path, tok, max_prompt_length=8)
    reference = DistributedBatchSampler(len(ds), 8, seed=3)
    ranks = [DataLoader(ds, 8, seed=3, pad_token_id=0, dp_rank=r, dp_size=4) for r in range(4)]
    for _ in range(5):
        global_batch = reference.next_global_batch()
        shards = [loader.next_batch() for loader in ranks]
        assert [len(s) for s in shards] == [2, 2, 2, 2]
        assert sum((s.indices for s in shards), []) == global_batch
        assert sum((s.groups for s in shards), []) == [f"g{i}" for i in global_batch]
        assert all(s.input_ids.shape == (2, 4) for s in shards)  # <bos> COPY a =


def test_eval_batches_cover_every_prompt_once_with_equal_shapes(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "COPY a ="} for _ in range(11)])
    ds = load_prompts(path, tok, max_prompt_length=8)
    per_rank = [list(eval_batches(ds, 4, pad_token_id=0, dp_rank=r, dp_size=2)) for r in range(2)]
    assert [len(b) for b in per_rank] == [3, 3] and all(len(x) == 2 for b in per_rank for x in b)
    seen = [i for batches in per_rank for b in batches for i, v in zip(b.indices, b.valid.tolist()) if v]
    assert sorted(seen) == list(range(11))


def test_pad_token_falls_back_to_eos(tok):
    class NoPad:
        pad_token_id, eos_token_id = None, 2

    assert pad_token_id(tok) == tok.pad_token_id == 0 and pad_token_id(NoPad()) == 2


# --- sources through HF datasets, keys, splits, caching ------------------------------------------


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GIL_MEGATRON_DATA_CACHE", str(tmp_path / "cache"))


ROWS = [{"prompt": "COPY a b =", "response": "a b", "group": "copy"}, {"prompt": "SORT b a =", "response": "a b"}]


@pytest.mark.parametrize("name", ["d.jsonl.gz", "d.json", "d.parquet", "d.csv"])
def test_file_formats_read_the_same_records(tok, tmp_path, name):
    import gzip

    import datasets

    path = tmp_path / name
    if name.endswith(".jsonl.gz"):
        with gzip.open(path, "wt") as f:
            f.write("".join(json.dumps(r) + "\n" for r in ROWS))
    elif name.endswith(".json"):
        path.write_text(json.dumps(ROWS))  # one JSON array
    else:
        table = datasets.Dataset.from_list(ROWS)
        table.to_parquet(str(path)) if name.endswith(".parquet") else table.to_csv(str(path), index=False)
    ds = load_sft(str(path), tok, max_length=16)
    assert ds.response_ids == [ids(tok, "a b") + [tok.eos_token_id]] * 2 and ds.groups == ["copy", None]
    assert ds.prompt_ids[1] == [tok.bos_token_id] + ids(tok, "SORT b a =")


def test_configurable_keys_and_dataset_dict_split(tok, tmp_path):
    import datasets

    rows = [{"question": "COPY a =", "answer": "a", "family": "copy"}]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows)})
    dd.save_to_disk(str(tmp_path / "dd"))
    keys = {"prompt": "question", "response": "answer", "group": "family"}
    ds = load_sft(str(tmp_path / "dd"), tok, max_length=8, keys=keys, split="test")
    assert ds.response_ids == [ids(tok, "a") + [tok.eos_token_id]] and ds.groups == ["copy"]
    assert len(load_sft(str(tmp_path / "dd") + ":train", tok, max_length=8, keys=keys)) == 1  # DIR:SPLIT
    with pytest.raises(DataError, match=r"dd: a DatasetDict with splits \['test', 'train'\] and no split 'dev'"):
        load_sft(str(tmp_path / "dd"), tok, max_length=8, keys=keys, split="dev")
    with pytest.raises(DataError, match=r"no column 'prompt' or 'chosen' \(columns: \['answer', 'family', "
                                        r"'question'\]\); fix: .* data.keys.prompt=answer"):
        load_prompts(str(tmp_path / "dd"), tok, max_prompt_length=8, split="test")
    with pytest.raises(DataError, match=r"d.txt: unknown data format '.txt'"):
        (tmp_path / "d.txt").write_text("x")
        load_prompts(str(tmp_path / "d.txt"), tok, max_prompt_length=8)


def test_tokenization_is_cached_and_shared_with_other_local_ranks(tok, tmp_path, monkeypatch):
    import threading

    from gil_megatron.data import datasets as dmod

    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "COPY a ="}, {"prompt": "REV a b ="}])
    cache = str(tmp_path / "c")
    got = {}
    # rank 1 starts first and must wait for local rank 0's cache file, never reading the source
    waiter = threading.Thread(target=lambda: got.setdefault(
        "r1", dmod.tokenized_table(path, "prompts", tok, cache_dir=cache, local_rank=1)["prompt_ids"]))
    waiter.start()
    r0 = dmod.tokenized_table(path, "prompts", tok, cache_dir=cache, local_rank=0)["prompt_ids"]
    waiter.join(timeout=30)
    assert got["r1"] == r0 == [[tok.bos_token_id] + ids(tok, "COPY a ="), [tok.bos_token_id] + ids(tok, "REV a b =")]
    monkeypatch.setattr(dmod, "read_table", lambda *a, **k: pytest.fail("the cache should have been used"))
    assert load_prompts(path, tok, max_prompt_length=8, cache_dir=cache).prompt_ids == r0
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "COPY b ="}])  # new contents -> a new cache entry
    with pytest.raises(pytest.fail.Exception):
        load_prompts(path, tok, max_prompt_length=8, cache_dir=cache)


# --- chat templates with a real BPE tokenizer ---------------------------------------------------------

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE tokenizer trained here (no hub), with a ChatML template and a generation prompt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    corpus = ["the cat sat on the mat", "what is the answer", "the answer is four", "hello there friend",
              "abcdef abcdef abcdef", "catsat thecat"] * 20
    raw.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


def test_chat_prompt_plus_response_is_the_whole_conversation(bpe, tmp_path):
    convo = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is the answer"}]
    reply = "the answer is four"
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"prompt": convo, "response": reply},  # messages + a string reply
        {"chosen": convo + [{"role": "assistant", "content": reply}]},  # one whole conversation
    ])
    ds = load_sft(path, bpe, max_length=64)
    full = bpe.apply_chat_template(convo + [{"role": "assistant", "content": reply}], tokenize=True)
    full = list(full["input_ids"] if hasattr(full, "keys") else full)
    prompt = bpe.apply_chat_template(convo, tokenize=True, add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    for p, r in zip(ds.prompt_ids, ds.response_ids):
        assert p == prompt  # the template decides BOS: none added
        assert p + r == full[: len(p) + len(r)] and r[-1] == bpe.eos_token_id
        assert bpe.decode(full[len(p) + len(r):]) == "\n"  # only the template's text after the end of turn
        assert bpe.decode(r) == reply + "<|im_end|>"
    prompts = load_prompts(path, bpe, max_prompt_length=64)
    assert prompts.prompt_ids == [prompt, prompt] and json.loads(prompts.prompts[0]) == convo


def test_chat_preferences_and_template_errors(bpe, tmp_path):
    convo = [{"role": "user", "content": "what is the answer"}]
    path = write_jsonl(tmp_path / "r.jsonl", [{"chosen": convo + [{"role": "assistant", "content": "four"}],
                                              "rejected": convo + [{"role": "assistant", "content": "the cat"}]}])
    ds = load_preferences(path, bpe, max_length=64)
    assert bpe.decode(ds.chosen_ids[0]) == "four<|im_end|>" and bpe.decode(ds.rejected_ids[0]) == "the cat<|im_end|>"
    with pytest.raises(DataError, match=r"r.jsonl: line 1: a conversation .* but the tokenizer has no chat template; "
                                        r"fix: set data.chat_template"):
        load_preferences(path, bpe, max_length=64, chat_template="none", cache_dir=str(tmp_path / "c2"))
    template = tmp_path / "t.jinja"
    template.write_text(CHATML)
    bpe_copy = __import__("copy").deepcopy(bpe)
    assert load_preferences(path, bpe_copy, max_length=64, chat_template=str(template),
                            cache_dir=str(tmp_path / "c3")).chosen_ids == ds.chosen_ids
    bad = write_jsonl(tmp_path / "b.jsonl", [{"prompt": [{"role": "user"}], "response": "x"}])
    with pytest.raises(DataError, match=r"b.jsonl: line 1: field 'prompt' message 0 must be"):
        load_sft(bad, bpe, max_length=64)


def test_raw_text_pairs_at_a_bpe_boundary(bpe, tmp_path):
    from gil_megatron.data import Encoder

    enc = Encoder(bpe, add_bos=False)
    # a space starts a new pre-token: prompt + response is exactly the whole text's encoding
    p, r = enc.pairs(["what is the"], [" answer"], ["x"])
    assert p[0] + r[0][:-1] == bpe("what is the answer", add_special_tokens=False)["input_ids"]
    # no space: BPE merges across the join; the prompt keeps its own ids (what generation sees)
    p, r = enc.pairs(["abc"], ["def"], ["x"])
    assert bpe("abcdef", add_special_tokens=False)["input_ids"] != p[0] + r[0][:-1]
    assert p[0] == bpe("abc", add_special_tokens=False)["input_ids"]
    assert r[0] == bpe("def", add_special_tokens=False)["input_ids"] + [bpe.eos_token_id]
    assert enc.boundary_merges == 1
