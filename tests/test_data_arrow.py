"""Records kept on disk (core/data_arrow.py, core/encode_arrow.py): the Arrow path gives the same records,
reports, splits, errors and token ids as the in-memory path, and its caches are keyed by what changes them."""

import json
import pickle
import random

import pytest

from inputs_tiny import byte_bpe, llama_style, write_jsonl
from prefalign.core import data_files, encode_arrow
from prefalign.core.data import (
    DataConfig,
    PreferenceRecord,
    load_preferences,
    load_record_set,
    load_records,
    split_records,
)
from prefalign.core.data_arrow import RecordSet
from prefalign.core.data_smells import count_smells
from prefalign.core.encode import encode_data as encode_list
from prefalign.core.errors import DataError
from prefalign.core.logprobs import longest_records

CHAT = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


@pytest.fixture(autouse=True)
def data_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFALIGN_DATA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def rows(n, seed=0):
    """n rows of every layout: pairs, rankings, scores, chat pairs, annotators and weights."""
    rng = random.Random(seed)
    words = ["tasty", "fresh", "bland", "soggy", "great", "awful"]
    out = []
    for i in range(n):
        text = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 6))) + f" {i}{k}" for k in range(3)]
        kind = i % 4
        if kind == 0:
            row = {"prompt": f"review {i}", "chosen": text[0], "rejected": text[1]}
        elif kind == 1:
            row = {"prompt": f"review {i}", "responses": text, "ranking": [2, 0]}
        elif kind == 2:
            row = {"prompt": f"review {i}", "responses": text, "scores": [0.5, 2.0, 1.0]}
        else:
            row = {
                "prompt": f"review {i}",
                "chosen": text[0],
                "rejected": text[1],
                "annotator": rng.randint(0, 3),
            }
        if rng.random() < 0.3:
            row["weight"] = rng.choice([0.5, 2.0])
        out.append(row)
    return out


def test_the_arrow_path_gives_the_records_and_report_of_the_list_path(tmp_path):
    """jsonl, parquet and a saved dataset: `load_record_set` == `load_preferences` record by record (origins
    included), with an equal LoadReport (skips and smells too: rows 3 and 7 repeat, row 9 is bad)."""
    import pyarrow as pa
    import pyarrow.parquet

    data = rows(40)
    data[7] = dict(data[3])
    data[9] = {"prompt": "x", "chosen": "same", "rejected": "same"}
    jsonl = write_jsonl(tmp_path / "p.jsonl", data)
    keys = sorted({k for r in data for k in r})
    table = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in data])
    pyarrow.parquet.write_table(table, tmp_path / "p.parquet", row_group_size=7)
    for source in (jsonl, tmp_path / "p.parquet"):
        expected = load_preferences(source, on_bad_row="skip")
        got = load_record_set(source, on_bad_row="skip")
        assert isinstance(got, RecordSet) and len(got) == len(expected) == 39
        assert list(got) == list(expected) and got[5] == expected[5] and got[-1] == expected[-1]
        assert [r.origin for r in got] == [r.origin for r in expected]
        assert got.report == expected.report and got.report.duplicates == 1
        assert got.report.skipped == {"identical responses": 1}


def test_the_same_errors_name_source_row_line_and_field(tmp_path):
    data = rows(12)
    data[5] = {"prompt": "x", "responses": ["a", "b"], "ranking": [0, 2]}
    path = write_jsonl(tmp_path / "bad.jsonl", data)
    with pytest.raises(DataError) as listed:
        load_preferences(path)
    with pytest.raises(DataError) as stored:
        load_record_set(path)
    assert str(stored.value) == str(listed.value)
    assert "bad.jsonl: row 5: field 'ranking': index out of range 2" in str(stored.value)
    assert "(line 6)" in str(stored.value)


def test_a_second_load_reads_the_cache_not_the_source_and_the_key_covers_bytes_and_options(
    tmp_path, monkeypatch, data_cache
):
    path = write_jsonl(tmp_path / "p.jsonl", rows(30))
    first = load_record_set(path)
    assert len(list(data_cache.glob("records-*.arrow"))) == 1

    def unread(*args, **kwargs):
        raise AssertionError("the source was read again")

    with monkeypatch.context() as m:
        m.setattr("prefalign.core.data.iter_rows", unread)
        again = load_record_set(path)
        assert again.key == first.key and list(again) == list(first) and again.report == first.report
    assert load_record_set(path, limit=10).key != first.key
    assert load_record_set(path, tie_policy="any-order").key != first.key
    write_jsonl(path, rows(30, seed=1))  # same name and size class, other bytes
    assert load_record_set(path).key != first.key


def test_load_records_splits_and_mixes_by_index_exactly_as_the_lists_did(tmp_path):
    """The held-out rows are the ones `split_records` picks from the loaded list (same seed), in order."""
    a = write_jsonl(tmp_path / "a.jsonl", rows(30))
    b = write_jsonl(tmp_path / "b.jsonl", rows(10, seed=2))
    train, held_out = load_records(DataConfig(train=str(a), eval_fraction=0.2), seed=3)
    expected_train, expected_eval = split_records(load_preferences(a), 0.2, 3)
    assert isinstance(train, RecordSet) and list(train) == expected_train and list(held_out) == expected_eval
    mixed, _ = load_records(
        DataConfig(train=[{"path": str(a), "weight": 1}, {"path": str(b), "weight": 3}], eval_fraction=0.0), 0
    )
    assert [m["used"] for m in mixed.mixture] == [10, 30] and len(mixed) == 40
    assert sum(r.origin.startswith(str(b)) for r in mixed) == 30


def test_smells_match_a_direct_count_on_random_data():
    """`SmellCounter` (hashes, numpy) against the definition, row by row with dicts: equal counts and examples."""

    def direct(records):
        def key(*parts):
            return json.dumps(parts, sort_keys=True)

        seen_rows, seen_pairs, dup, con, examples = {}, {}, 0, 0, {}
        for i, r in enumerate(records):
            unranked = sorted(key(r.responses[j]) for j in range(len(r.responses)) if j not in r.ranking)
            row_key = key(r.annotator, r.prompt, [r.responses[j] for j in r.ranking], unranked)
            if row_key in seen_rows:
                dup += 1
                examples.setdefault("d", f"{r.origin} repeats {records[seen_rows[row_key]].origin}")
                continue
            seen_rows[row_key] = i
            order = list(r.ranking) + [j for j in range(len(r.responses)) if j not in r.ranking]
            pairs = [
                (r.responses[b], r.responses[w]) for a, b in enumerate(r.ranking) for w in order[a + 1 :]
            ]
            earlier = [
                seen_pairs[key(r.annotator, r.prompt, w, b)]
                for b, w in pairs
                if key(r.annotator, r.prompt, w, b) in seen_pairs
            ]
            for b, w in pairs:
                seen_pairs.setdefault(key(r.annotator, r.prompt, b, w), i)
            if earlier:
                con += 1
                examples.setdefault("c", f"{r.origin} contradicts {records[min(earlier)].origin}")
        return dup, con, list(examples.values())

    rng = random.Random(0)
    for _ in range(300):
        records = []
        for i in range(rng.randint(0, 12)):
            k = rng.choice([2, 3])
            chat = rng.random() < 0.2
            responses = rng.sample("abcd", k)
            if chat:
                responses = [[{"role": "assistant", "content": x}] for x in responses]
            prompt = [{"role": "user", "content": rng.choice("pq")}] if chat else rng.choice("pq")
            record = PreferenceRecord(
                prompt, responses, rng.sample(range(k), rng.randint(1, k)), rng.choice([None, "x"])
            )
            record.origin = f"row {i}"
            records.append(record)
        assert count_smells(records) == direct(records)


def test_tokenized_sets_equal_the_list_encoder_and_their_cache_key_covers_the_tokenizer(
    tmp_path, monkeypatch
):
    path = write_jsonl(tmp_path / "p.jsonl", rows(24))
    records = load_record_set(path)
    tokenizer = byte_bpe()
    data = DataConfig(max_length=12, max_prompt_length=4)
    encoded = encode_arrow.encode_data(tokenizer, records, data, "data.train", (12, 4))
    expected = encode_list(tokenizer, load_preferences(path), data, "data.train", (12, 4))
    assert list(encoded) == list(expected) and encoded[3] == expected[3]
    assert encoded.report == expected.report and encoded.report.responses_cut > 0
    assert encoded.__getitems__([5, 1]) == [expected[5], expected[1]]
    assert encoded.longest(3) == longest_records(list(expected), 3)
    clone = pickle.loads(pickle.dumps(encoded))  # DataLoader workers get the set by pickle: by file
    assert len(pickle.dumps(encoded)) < 50_000 and clone[7] == expected[7]

    with monkeypatch.context() as m:  # a second run tokenizes nothing
        m.setattr(encode_arrow, "encode_records", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
        again = encode_arrow.encode_data(tokenizer, records, data, "data.train", (12, 4))
        assert again.key == encoded.key and list(again) == list(expected) and again.report == encoded.report
    changed = [
        encode_arrow.encode_data(tokenizer, records, data, "x", (16, 4)).key,
        encode_arrow.encode_data(byte_bpe(chat_template=CHAT), records, data, "x", (12, 4)).key,
        encode_arrow.encode_data(byte_bpe(eos="<pad>"), records, data, "x", (12, 4)).key,
    ]
    assert encoded.key not in changed and len(set(changed)) == 3
    sentencepiece = llama_style()  # BOS before prompts, a Metaspace pre-tokenizer: batched == one by one
    on_disk = encode_arrow.encode_data(sentencepiece, records, data, "data.train", (12, 4))
    assert list(on_disk) == list(
        encode_list(sentencepiece, load_preferences(path), data, "data.train", (12, 4))
    )


def test_reference_logps_attach_to_records_read_from_disk(tmp_path):
    records = load_record_set(write_jsonl(tmp_path / "p.jsonl", rows(8)))
    encoded = encode_arrow.encode_data(byte_bpe(), records, DataConfig(), "data.train", (64, 32))
    values = [[float(i), -float(i), 0.5][: len(encoded[i].response_ids)] for i in range(len(encoded))]
    encoded.set_reference_logps(values)
    assert [r.reference_logps for r in encoded] == values and encoded[2].reference_logps == values[2]


def test_hub_sources_pass_name_revision_split_and_stream_with_a_local_stand_in(monkeypatch):
    """`data.train: [{path: owner/prefs, name, revision, split, streaming}]` reach `datasets.load_dataset`;
    a streamed branch is read again each time (nothing pins its content), a pinned commit is cached."""
    import datasets

    calls = []

    def fake_load_dataset(path, split, **options):
        calls.append((path, split, options))
        assert options.get("streaming")
        return datasets.IterableDataset.from_generator(lambda: iter(rows(12)))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    source = {"path": "owner/prefs", "name": "en", "revision": "main", "split": "test", "streaming": True}
    train, _ = load_records(DataConfig(train=[source], eval_fraction=0.0), seed=0)
    assert len(train) == 12 and train[0].origin == "owner/prefs row 0"
    assert calls == [("owner/prefs", "test", {"name": "en", "revision": "main", "streaming": True})]
    assert train.key is None  # a branch can move: not cached
    pinned = dict(source, revision="a" * 40)
    first, _ = load_records(DataConfig(train=[pinned], eval_fraction=0.0), seed=0)
    again, _ = load_records(DataConfig(train=[pinned], eval_fraction=0.0), seed=0)
    assert first.key == again.key is not None and len(calls) == 2
    assert data_files.looks_like_hub_name("owner/prefs")


def test_latent_cache_is_written_in_shards_once_and_read_memory_mapped(tmp_path, monkeypatch):
    """A stand-in VAE (latents = 2 x pixels + 1): the cached column equals encoding each row; 7 rows in shards
    of 3 make 3 files; a second build decodes no image; a lost shard is rebuilt alone."""
    import torch

    from prefalign.core import conditioning
    from prefalign.core.images import ImageDataset

    class Conditioner:
        device = torch.device("cpu")

        def __init__(self):
            self.parts = type("Parts", (), {"vae": torch.nn.Linear(1, 1)})()
            self.parts.vae.config = type("Config", (), {"scaling_factor": 0.5})()
            self.encoded = 0

        def model_images(self, x):
            self.encoded += len(x)
            return 2 * x + 1

        def time_ids(self, batch, n):
            return torch.zeros(n, 6)

    pixels = torch.randn(7, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    data = ImageDataset({"chosen": pixels, "rejected": -pixels, "caption": [f"c{i}" for i in range(7)]})
    vae = Conditioner()
    cached = conditioning.cache_latents(data, vae, tmp_path, batch_size=2, shard_rows=3)
    (folder,) = tmp_path.glob("latents-*")
    assert sorted(p.name for p in folder.iterdir()) == [
        "done.json",
        *[f"shard-0000{k}.safetensors" for k in range(3)],
    ]
    assert len(cached) == 7 and vae.encoded == 14 and cached[5]["caption"] == "c5"
    assert torch.equal(torch.stack([cached[i]["chosen"] for i in range(7)]), 2 * pixels + 1)
    assert torch.equal(cached[6]["rejected"], 1 - 2 * pixels[6])
    clone = pickle.loads(pickle.dumps(cached.data["chosen"]))
    assert torch.equal(clone[4], cached[4]["chosen"])
    again = conditioning.cache_latents(data, vae, tmp_path, batch_size=2, shard_rows=3)
    assert vae.encoded == 14 and torch.equal(again[2]["chosen"], cached[2]["chosen"])
    (folder / "shard-00001.safetensors").unlink()
    (folder / "done.json").unlink()
    conditioning.cache_latents(data, vae, tmp_path, batch_size=2, shard_rows=3)
    assert vae.encoded == 14 + 6  # the one missing shard: 3 rows, chosen and rejected
