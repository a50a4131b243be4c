"""Data layer: file loading with actionable errors, document-respecting packing, shuffling, resume, split."""

import json
import random
import sys

import pytest
import torch

from nanoseek.data import (
    PackedDataset,
    document_attention_mask,
    document_position_ids,
    label_mask,
    load_chat_jsonl,
    load_texts,
    pack_documents,
    split_documents,
)

EOS, BOS, PAD = 1, 0, 2


def random_docs(n=40, seed=0, max_len=50):
    rng = random.Random(seed)
    return [[rng.randrange(10, 1000) for _ in range(rng.randrange(0, max_len))] for _ in range(n)]


# ---------------------------------------------------------------- loading

def test_txt_document_modes_and_folder_order(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("doc one\nstill one\n\n\n  \ndoc two 中文\n", encoding="utf-8")
    (tmp_path / "skip.csv").write_text("ignored", encoding="utf-8")
    assert list(load_texts(tmp_path)) == ["doc one\nstill one\n\n\n  \ndoc two 中文\n", "second file\n"]
    assert list(load_texts(tmp_path, txt_split="blank_line")) == ["doc one\nstill one", "doc two 中文", "second file"]
    assert list(load_texts(tmp_path / "a.txt", txt_split="line")) == ["doc one", "still one", "doc two 中文"]
    with pytest.raises(ValueError, match="txt_split"):
        list(load_texts(tmp_path, txt_split="para"))


def test_jsonl_text_field_and_blank_lines(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "one"}\n\n{"text": "二", "id": 3}\n', encoding="utf-8")
    assert list(load_texts([p])) == ["one", "二"]
    q = tmp_path / "e.jsonl"
    q.write_text('{"body": "x"}\n', encoding="utf-8")
    assert list(load_texts(q, text_field="body")) == ["x"]


@pytest.mark.parametrize("lines,match", [
    (['{"text": "ok"}', '{"text": "ok"}', '{"text": broken'], r"d\.jsonl:3: invalid JSON"),
    (['{"text": "ok"}', '{"other": "x"}'], r"d\.jsonl:2: field 'text' missing"),
    (['{"text": 5}'], r"d\.jsonl:1: field 'text' must be a string"),
    (['["a list"]'], r"d\.jsonl:1: expected a JSON object"),
])
def test_jsonl_bad_line_names_file_and_line(tmp_path, lines, match):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        list(load_texts(p))


def test_unknown_suffix_and_missing_path_are_named(tmp_path):
    p = tmp_path / "data.csv"
    p.write_text("a", encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\.csv: unsupported file type"):
        list(load_texts(p))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        list(load_texts(tmp_path / "nope.jsonl"))


def test_parquet_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["alpha", None, "贝塔"], "n": [1, 2, 3]}), p)
    assert list(load_texts(p)) == ["alpha", "贝塔"]
    with pytest.raises(ValueError, match=r"d\.parquet: column 'content' not found"):
        list(load_texts(p, text_field="content"))


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    p = tmp_path / "d.parquet"
    p.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        list(load_texts(p))


def test_load_chat_jsonl_validates_records(tmp_path):
    good = {"messages": [{"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "4", "reasoning_content": "add", "extra": 1}]}
    p = tmp_path / "chat.jsonl"
    p.write_text(json.dumps(good) + "\n", encoding="utf-8")
    assert load_chat_jsonl(p) == [[{"role": "user", "content": "2+2?"},
                                   {"role": "assistant", "content": "4", "reasoning_content": "add"}]]
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}
    p.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"chat\.jsonl:2: messages\[1\]\.role must be one of"):
        load_chat_jsonl(p)
    p.write_text(json.dumps({"messages": [{"role": "user", "content": ["x"]}]}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"chat\.jsonl:1: messages\[0\]\.content must be a string"):
        load_chat_jsonl(p)
    p.write_text(json.dumps({"conversation": []}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"chat\.jsonl:1: field 'messages' missing"):
        load_chat_jsonl(p)


# ---------------------------------------------------------------- packing

@pytest.mark.parametrize("bos_id", [None, BOS])
def test_pack_keeps_every_token_once_in_order(bos_id):
    docs = random_docs()
    docs[3] = list(range(10, 200))  # longer than several rows
    seq_len = 16
    tokens, doc_ids = pack_documents(docs, seq_len, EOS, bos_id=bos_id, pad_id=PAD)
    assert tokens.dtype == doc_ids.dtype == torch.int64 and tokens.shape == doc_ids.shape
    assert tokens.shape[1] == seq_len + 1
    flat, flat_docs = tokens.flatten().tolist(), doc_ids.flatten().tolist()
    expected = [t for d in docs if d for t in ([bos_id] if bos_id is not None else []) + d + [EOS]]
    n = len(expected)
    assert flat[:n] == expected and flat[n:] == [PAD] * (len(flat) - n) and len(flat) - n <= seq_len
    for i, d in enumerate(docs):  # doc ids record exactly where each document's tokens went
        got = [t for t, di in zip(flat, flat_docs) if di == i]
        assert got == (([bos_id] if bos_id is not None else []) + d + [EOS] if d else [])
    assert set(flat_docs[n:]) <= {-1}
    dropped = pack_documents(docs, seq_len, EOS, bos_id=bos_id)  # no pad_id: the tail is dropped
    assert dropped.tokens.shape[0] == n // (seq_len + 1) and dropped.tokens.flatten().tolist() == expected[
        : dropped.tokens.numel()]


def test_masks_from_doc_ids_keep_documents_apart():
    doc_ids = torch.tensor([[4, 4, 4, 7, 7, -1]])  # a row: tail of doc 4, doc 7, then padding
    assert label_mask(doc_ids).tolist() == [[True, True, False, True, False]]
    inputs = doc_ids[:, :-1]  # (1, 5)
    mask = document_attention_mask(inputs)[0]
    assert mask.tolist() == [
        [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert document_position_ids(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0]]


def epoch_batches(ds, batch_size, epochs):
    return [b.tokens.clone() for b in ds.batches(batch_size, epochs=epochs)]


def test_shuffle_is_deterministic_per_seed_and_changes_per_epoch():
    docs = random_docs(60)
    a = epoch_batches(PackedDataset(docs, 8, EOS, seed=1), 4, 2)
    b = epoch_batches(PackedDataset(docs, 8, EOS, seed=1), 4, 2)
    c = epoch_batches(PackedDataset(docs, 8, EOS, seed=2), 4, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    half = len(a) // 2
    assert not torch.equal(torch.cat(a[:half]), torch.cat(a[half:]))  # epoch 1 is ordered differently


def test_each_shuffled_epoch_holds_every_token_once():
    docs = random_docs(30)
    ds = PackedDataset(docs, 8, EOS, pad_id=PAD, seed=3)
    expected = sorted(t for d in docs if d for t in d + [EOS])
    for epoch in range(2):
        tokens, doc_ids = ds.epoch_rows(epoch)
        got = sorted(int(t) for t, di in zip(tokens.flatten(), doc_ids.flatten()) if di >= 0)
        assert got == expected


def test_resume_from_state_dict_gives_identical_batches():
    docs = random_docs(50)
    ds = PackedDataset(docs, 8, EOS, seed=5)
    it = ds.batches(3)
    for _ in range(4):
        next(it)
    state = json.loads(json.dumps(ds.state_dict()))  # survives a JSON checkpoint
    rest = [next(it) for _ in range(3 * len(ds) // 3)]  # runs past an epoch boundary
    resumed = PackedDataset(docs, 8, EOS, seed=0)
    resumed.load_state_dict(state)
    it2 = resumed.batches(3)
    again = [next(it2) for _ in range(len(rest))]
    assert all(torch.equal(x.tokens, y.tokens) and torch.equal(x.doc_ids, y.doc_ids) for x, y in zip(rest, again))
    assert resumed.epoch >= 1
    with pytest.raises(ValueError, match="seq_len"):
        PackedDataset(docs, 16, EOS).load_state_dict(state)


def test_batches_shapes_and_eval_pass_without_drop():
    docs = random_docs(20)
    ds = PackedDataset(docs, 8, EOS, pad_id=PAD, shuffle=False)
    batches = list(ds.batches(4, epochs=1, drop_last=False))
    assert all(b.tokens.shape[1] == 9 and b.tokens.dtype == torch.int64 for b in batches)
    assert sum(b.tokens.shape[0] for b in batches) == len(ds)
    assert list(ds.batches(4, epochs=1)) == []  # the epoch is done: the iterator resumes after it
    with pytest.raises(ValueError, match="batch_size 1000 exceeds"):
        next(PackedDataset(docs, 8, EOS).batches(1000))


def test_split_is_disjoint_and_stable():
    docs = [f"doc {i}" for i in range(100)]
    train, held = split_documents(docs, 0.1, seed=0)
    assert len(held) == 10 and not set(train) & set(held) and sorted(train + held) == sorted(docs)
    assert train == [d for d in docs if d in set(train)]  # input order kept
    assert split_documents(docs, 0.1, seed=0) == (train, held)
    assert split_documents(docs, 0.1, seed=1)[1] != held
    assert split_documents(docs, 0.0) == (docs, [])
    with pytest.raises(ValueError, match="eval_fraction"):
        split_documents(docs, 1.0)
