"""canvaslm data: sources, filters, the on-disk format and its reader (train/shards.py), config checking, the CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import canvaslm
from canvaslm.errors import CanvasError
from canvaslm.train import data, data_cli
from canvaslm.train.shards import FORMAT, FORMAT_VERSION, PartedShards, Shards, open_shards, vocab_hash

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def smol():
    return canvaslm.load("smol-ar")


@pytest.fixture
def no_model_load(monkeypatch):
    """Config and input errors must come before the (slow) model load."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")
    monkeypatch.setattr(canvaslm, "load", refuse)


def write_jsonl(path: Path, records: list) -> Path:
    lines = [r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode() for r in records]
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def config(*sources: dict, **filters) -> dict:
    return {"source": list(sources), "filters": filters}


# ---------------------------------------------------------------------------------------------------- round trip


def test_round_trip_gives_back_exact_ids_from_a_memory_map(smol, tmp_path):
    write_jsonl(tmp_path / "chats.jsonl", [chat(f"Question {i}?", f"Answer number {i}.") for i in range(5)])
    (tmp_path / "code.py").write_text("def f(x):\n    return x * 2\n" * 40, encoding="utf-8")
    cfg = config({"kind": "jsonl", "paths": [str(tmp_path / "chats.jsonl")]},
                 {"kind": "files", "globs": [str(tmp_path / "*.py")], "context_tokens": 16, "response_tokens": 8})
    expected = list(data.jsonl_chats([tmp_path / "chats.jsonl"], smol.tokenizer)) + \
        list(data.text_files([str(tmp_path / "*.py")], smol.tokenizer, 16, 8))
    out = tmp_path / "out"
    manifest = data.build({**cfg, "filters": {"dedup": False}}, out, progress=False, lm=smol)

    shards = Shards(out, tokenizer=smol.tokenizer)
    assert len(shards) == len(expected) == manifest["examples"]
    assert [(p.tolist(), r.tolist()) for p, r in shards] == [(list(p), list(r)) for p, r in expected]
    prompt, _ = shards[-1]
    assert isinstance(shards.tokens, np.memmap) and np.shares_memory(prompt, shards.tokens)
    assert prompt.dtype == np.uint32 and shards.index.dtype == np.int64
    assert sorted(p.name for p in out.iterdir()) == ["index.npy", "manifest.json", "tokens.bin"]
    assert not list(tmp_path.glob(".out*")), "the staging directory is left behind"
    with pytest.raises(IndexError):
        shards[len(shards)]


def test_manifest_records_tokenizer_counts_lengths_and_build(smol, tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [chat("Hi?", "Hello there."), chat("Why?", "Because the answer is long.")])
    manifest = data.build(data.parse_config(config({"kind": "jsonl", "paths": ["c.jsonl"], "name": "tiny"}),
                                            base_dir=str(tmp_path)), tmp_path / "d", progress=False, lm=smol)
    assert manifest == Shards(tmp_path / "d").manifest
    assert manifest["format"] == FORMAT and manifest["format_version"] == FORMAT_VERSION
    tok = manifest["tokenizer"]
    assert tok["source"] == "smol-ar" and tok["vocab_size"] == smol.tokenizer.vocab_size == 49152
    assert tok["vocab_sha256"] == vocab_hash(smol.tokenizer) and tok["end_of_turn_id"] == 2
    assert manifest["sources"] == [{"name": "tiny", "kind": "jsonl", "produced": 2, "kept": 2, "source_drops": {}}]
    assert manifest["tokens"] == manifest["prompt_tokens"] + manifest["response_tokens"]
    assert manifest["lengths"]["response"]["min"] == len(smol.tokenizer.encode("Hello there.")) + 1
    assert manifest["build"]["config"]["source"][0]["kind"] == "jsonl" and manifest["created"]
    assert manifest["filters"]["dedup"] is True and manifest["duplicates_dropped"] == 0


# ---------------------------------------------------------------------------------------------------- filters


def test_dedup_and_length_filters_are_counted(smol, tmp_path):
    records = [chat("Same?", "Same answer."), chat("Same?", "Same answer."), chat("Same?", "Other answer."),
               chat("Long?", "word " * 60), chat("x" * 400, "Short prompt is not this one.")]
    write_jsonl(tmp_path / "c.jsonl", records)
    manifest = data.build(config({"kind": "jsonl", "paths": [str(tmp_path / "c.jsonl")]}, max_response_tokens=40,
                                 max_prompt_tokens=100, min_response_tokens=3), tmp_path / "d", progress=False, lm=smol)
    assert manifest["filters"]["dropped"] == {"duplicate": 1, "prompt_too_long": 1, "response_too_long": 1}
    assert manifest["duplicates_dropped"] == 1 and manifest["examples"] == 2
    assert manifest["sources"][0]["produced"] == 5 and manifest["sources"][0]["kept"] == 2


def test_near_dedup_drops_almost_identical_examples(smol, tmp_path):
    text = " ".join(f"item{i}" for i in range(80))
    write_jsonl(tmp_path / "c.jsonl", [chat("List?", text), chat("List?", text + " end"),
                                       chat("List?", "Something entirely different, said in other words.")])
    source = {"kind": "jsonl", "paths": [str(tmp_path / "c.jsonl")]}
    near = data.build(config(source, near_dedup=True), tmp_path / "near", progress=False, lm=smol)
    exact = data.build(config(source), tmp_path / "exact", progress=False, lm=smol)
    assert near["filters"]["dropped"] == {"near_duplicate": 1} and near["examples"] == 2
    assert exact["filters"]["dropped"] == {} and exact["examples"] == 3


# ---------------------------------------------------------------------------------------------------- sources


def test_text_files_cuts_windows_and_skips_unusable_files(smol, tmp_path):
    tok = smol.tokenizer
    code = "".join(f"def function_{i}(a, b):\n    return a + b * {i}\n\n" for i in range(30))
    (tmp_path / "a.py").write_text(code, encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.txt").write_text("Plain prose about canvases. " * 30, encoding="utf-8")
    (tmp_path / "tiny.py").write_text("x = 1\n", encoding="utf-8")
    (tmp_path / "blob.txt").write_bytes(b"abc\x00\x01\x02" * 50)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    stats: Counter = Counter()
    examples = list(data.text_files(["**/*.py", "**/*.txt"], tok, context_tokens=32, response_tokens=16,
                                    seed=None, base_dir=tmp_path, stats=stats))
    assert stats == Counter(files_used=2, files_too_short=1, files_binary=1, files_undecodable=1)
    ids = tok.encode(code)
    from_a = [(p, r) for p, r in examples if tok.decode(p).startswith("def function_0")]
    assert from_a[0] == (ids[:32], ids[32:48])
    windows = [e for e in examples if len(e[0]) == 32]
    assert len(windows) == len(examples) and all(1 <= len(r) <= 16 for _, r in examples)
    a_windows = examples[:len(range(0, len(ids) - 32, 48))]  # sorted order: a.py first
    assert [t for p, r in a_windows for t in p + r] == ids
    assert len(list(data.text_files(["**/*.py"], tok, 32, 16, max_examples=2, base_dir=tmp_path))) == 2


def test_jsonl_formats_prompt_and_response(smol, tmp_path):
    tok = smol.tokenizer
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}]},
        "",
        {"prompt": "2+2?", "completion": "4"},
        {"prompt": [{"role": "user", "content": "Name?"}], "completion": [{"role": "assistant", "content": "Smol."}]},
    ])
    examples = list(data.jsonl_chats([path], tok))
    assert len(examples) == 3
    prompt, response = examples[0]
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    assert prompt == smol.chat_prompt_ids(messages)
    assert response == tok.encode("Hello!") + [2]
    assert examples[1] == (smol.chat_prompt_ids([{"role": "user", "content": "2+2?"}]), tok.encode("4") + [2])
    assert examples[2][1] == tok.encode("Smol.") + [2]


@pytest.mark.parametrize("line, problem", [
    ("{not json", "Expecting property name"),
    ('["a list"]', "expected a JSON object"),
    ('{"text": "no chat"}', "expected a 'messages' list"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', "at least two messages"),
    ('{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}', "last message"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]}', "message 0"),
    ('{"prompt": "q", "completion": [{"role": "assistant", "content": "a"}]}', "must both be strings or both lists"),
    (b'{"messages": "caf\xe9"}', "can't decode byte 0xe9"),
])
def test_malformed_jsonl_line_names_file_and_line(smol, tmp_path, line, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [chat("Fine?", "Yes."), line])
    with pytest.raises(CanvasError, match=rf"bad\.jsonl:2: .*{problem}"):
        list(data.jsonl_chats([path], smol.tokenizer))
    stats: Counter = Counter()
    assert len(list(data.jsonl_chats([path], smol.tokenizer, skip_malformed=True, stats=stats))) == 1
    assert stats == Counter(malformed_lines=1)


def test_magpie_with_the_real_teacher(smol, tmp_path):
    cfg = config({"kind": "magpie", "n": 4, "max_new_tokens": 24, "batch_size": 4, "max_question_tokens": 32,
                  "seed": 0, "keep_truncated": True})
    manifest = data.build(cfg, tmp_path / "m", progress=False, lm=smol)
    shards = Shards(tmp_path / "m")
    tok = smol.tokenizer
    header = tok.encode(data.user_turn_prefix(tok))
    generation_prompt = tok.encode("<|im_end|>\n<|im_start|>assistant\n")
    assert 1 <= len(shards) <= 4
    truncated = 0
    for prompt, response in shards:
        prompt, response = prompt.tolist(), response.tolist()
        assert prompt[:len(header)] == header and prompt[-len(generation_prompt):] == generation_prompt
        question = tok.decode(prompt[len(header):-len(generation_prompt)])
        assert question.strip() and len(question.split()) >= 3
        assert prompt == smol.chat_prompt_ids([{"role": "user", "content": question}])
        if response[-1] == 2:  # the answer ended: end-of-turn appended
            assert 2 not in response[:-1] and len(response) <= 25
        else:  # cut by max_new_tokens, kept as a true prefix
            assert len(response) == 24 and 0 not in response and 2 not in response
            truncated += 1
    drops = manifest["sources"][0]["source_drops"]
    assert drops.get("answers_truncated_kept", 0) == truncated
    assert drops["questions_sampled"] >= len(shards)


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("table, message", [
    ({"tokeniser": {}, "source": [{"kind": "jsonl", "paths": []}]},
     r"top level: unknown key 'tokeniser' \(did you mean 'tokenizer'\?\)"),
    (config({"kind": "files", "globz": ["*.py"]}),
     r"\[\[source\]\] #1 \(kind = 'files'\): unknown key 'globz' \(did you mean 'globs'\?\)"),
    (config({"kind": "jsonl", "paths": ["x"]}, max_respons_tokens=3),
     r"\[filters\]: unknown key 'max_respons_tokens'.*'max_response_tokens'"),
    (config({"kind": "magpi", "n": 3}), r"key 'kind' must be one of .*did you mean 'magpie'"),
    (config({"kind": "magpie"}), r"missing required key 'n'"),
    (config({"kind": "magpie", "n": "4"}), r"key 'n' expected an integer, found '4'"),
    (config({"kind": "magpie", "n": 0}), r"key 'n' must be >= 1"),
    (config({"kind": "magpie", "n": 2, "top_p": 1.5}), r"key 'top_p' must be in \(0, 1\]"),
    (config({"kind": "files", "globs": "*.py"}), r"key 'globs' expected a list of a string"),
    ({"source": []}, r"at least one \[\[source\]\]"),
])
def test_bad_config_is_refused_before_any_compute(no_model_load, tmp_path, table, message):
    with pytest.raises(CanvasError, match=message):
        data.build(table, tmp_path / "out", progress=False)


def test_config_file_errors_name_the_file(no_model_load, tmp_path):
    with pytest.raises(CanvasError, match=r"nope\.toml: config file not found"):
        data.build(tmp_path / "nope.toml", tmp_path / "out")
    bad = tmp_path / "bad.toml"
    bad.write_text('[[source]]\nkind = "jsonl"\npaths = ["c.jsonl"]\nskip_malformd = true\n')
    with pytest.raises(CanvasError, match=r"bad\.toml: \[\[source\]\] #1 .*'skip_malformd'.*'skip_malformed'"):
        data.build(bad, tmp_path / "out")


def test_missing_inputs_are_refused_before_loading_the_model(no_model_load, tmp_path):
    with pytest.raises(CanvasError, match=r"missing\.jsonl: jsonl source file not found"):
        data.build(config({"kind": "jsonl", "paths": [str(tmp_path / "missing.jsonl")]}), tmp_path / "o")
    with pytest.raises(CanvasError, match=r"glob '\*\*/\*\.nothing' .*matches no file"):
        data.build(data.parse_config(config({"kind": "files", "globs": ["**/*.nothing"]}), base_dir=str(tmp_path)),
                   tmp_path / "o")
    (tmp_path / "exists").mkdir()
    write_jsonl(tmp_path / "c.jsonl", [chat("a?", "b")])
    with pytest.raises(CanvasError, match=r"exists: already exists"):
        data.build(config({"kind": "jsonl", "paths": [str(tmp_path / "c.jsonl")]}), tmp_path / "exists")


@pytest.fixture
def built(smol, tmp_path) -> Path:
    write_jsonl(tmp_path / "c.jsonl", [chat(f"Q{i}?", f"A{i}.") for i in range(3)])
    data.build(config({"kind": "jsonl", "paths": [str(tmp_path / "c.jsonl")]}), tmp_path / "d", progress=False, lm=smol)
    return tmp_path / "d"


def test_overwrite_replaces_a_directory(smol, built):
    write_jsonl(built.parent / "c.jsonl", [chat("Only one?", "Yes.")])
    source = {"kind": "jsonl", "paths": [str(built.parent / "c.jsonl")]}
    assert data.build(config(source), built, overwrite=True, progress=False, lm=smol)["examples"] == 1
    assert len(Shards(built)) == 1
    (built.parent / "precious").mkdir()
    (built.parent / "precious" / "thesis.tex").write_text("keep me")
    with pytest.raises(CanvasError, match="precious: refusing to replace it"):
        data.build(config(source), built.parent / "precious", overwrite=True, progress=False, lm=smol)


def test_corrupt_index_is_a_clear_error(built):
    index = np.load(built / "index.npy")
    index[1, 0] = 10_000
    np.save(built / "index.npy", index)
    with pytest.raises(CanvasError, match=r"index\.npy: row 1 .* outside tokens\.bin"):
        Shards(built)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "tokens.bin").write_bytes((d / "tokens.bin").read_bytes()[:-4]), r"tokens\.bin: .*bytes"),
    (lambda d: (d / "tokens.bin").unlink(), r"tokens\.bin: missing"),
    (lambda d: np.save(d / "index.npy", np.zeros((3, 2), np.int64)), r"index\.npy: expected an int64 .*\[3, 2\]"),
    (lambda d: np.save(d / "index.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True), r"index\.npy: not a"),
    (lambda d: (d / "manifest.json").write_text("{"), r"manifest\.json: not valid JSON"),
    (lambda d: (d / "manifest.json").write_text(json.dumps({**json.loads((d / "manifest.json").read_text()),
                                                           "format_version": 99})), r"'format_version' expected 1"),
    (lambda d: (d / "manifest.json").unlink(), r"manifest\.json: missing"),
])
def test_damaged_directory_is_a_clear_error(built, damage, message):
    damage(built)
    with pytest.raises(CanvasError, match=message):
        Shards(built)


def test_a_different_tokenizer_is_refused(built, smol):
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    from canvaslm.checkpoints.tokenizer import Tokenizer

    other = Tokenizer(Backend(WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")), source="tiny")
    with pytest.raises(CanvasError, match="vocabulary differs"):
        Shards(built, tokenizer=other)


# ---------------------------------------------------------------------------------------------------- CLI, example


def test_cli_build_and_info(smol, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(canvaslm, "load", lambda *a, **k: smol)
    write_jsonl(tmp_path / "c.jsonl", [chat("Q?", "A."), chat("Q?", "A.")])
    (tmp_path / "cfg.toml").write_text('[tokenizer]\nmodel = "smol-ar"\n\n[[source]]\nkind = "jsonl"\n'
                                       'paths = ["c.jsonl"]\n', encoding="utf-8")
    assert data_cli.main(["build", str(tmp_path / "cfg.toml"), "--out", str(tmp_path / "d"), "--no-progress"]) == 0
    assert "1 examples" in capsys.readouterr().out
    assert data_cli.main(["data", "info", str(tmp_path / "d"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["filters"]["dropped"] == {"duplicate": 1}
    assert data_cli.main(["info", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: not a directory" in capsys.readouterr().err


def test_example_config_is_valid(smol):
    cfg = data.load_config(EXAMPLES / "data-smol.toml")
    assert [s.kind for s in cfg.sources] == ["magpie", "files", "jsonl"]
    for source in cfg.sources:
        if source.kind == "files":
            assert data.expand_globs(source.globs, cfg.base_dir)
        if source.kind == "jsonl":
            assert len(list(data.jsonl_chats(source.paths, smol.tokenizer, base_dir=cfg.base_dir))) >= 5


def test_degenerate_generations_are_named():
    assert data._degenerate("", [], min_words=1) == "empty"
    assert data._degenerate("Why?", [1, 2], min_words=3) == "too_short"
    loop = [5, 6, 7, 8] * 10
    assert data._degenerate("la " * 40, loop, min_words=1) == "repetitive"
    assert data._degenerate("A fine question about rivers?", list(range(40)), min_words=3) is None


# ---------------------------------------------------------------------------------------------------- parts


def test_a_build_in_parts_resumes_and_reads_as_one_dataset(smol, tmp_path):
    write_jsonl(tmp_path / "chats.jsonl", [chat(f"Question {i}?", f"Answer number {i}.") for i in range(3)])
    for n in range(8):
        (tmp_path / f"code{n}.py").write_text("".join(f"def f{n}_{i}(x):\n    return x * {i}\n" for i in range(60)))
    cfg = data.parse_config(config({"kind": "jsonl", "paths": [str(tmp_path / "chats.jsonl")]},
                                   {"kind": "files", "globs": [str(tmp_path / "*.py")], "context_tokens": 16,
                                    "response_tokens": 8, "max_examples": 4, "seed": 0}), base_dir=str(tmp_path))
    out = tmp_path / "parts"
    first = data.build_parts(cfg, out, 2, progress=False, lm=smol)
    assert [m["build"]["part"] for m in first] == [0, 1]
    assert first[0]["sources"][0]["kept"] == 3 and len(first[1]["sources"]) == 1  # jsonl only in part 0
    windows = [Shards(out / f"part-0000{i}")[-1][0].tolist() for i in (0, 1)]
    assert windows[0] != windows[1]  # part i draws with seed + i
    before = (out / "part-00000" / "tokens.bin").stat().st_mtime_ns
    again = data.build_parts(cfg, out, 3, progress=False, lm=smol)  # resumes: parts 0 and 1 are kept
    assert [m["build"]["part"] for m in again] == [2]
    assert (out / "part-00000" / "tokens.bin").stat().st_mtime_ns == before
    shards = open_shards(out)
    assert isinstance(shards, PartedShards) and len(shards) == (3 + 4) + 4 + 4
    assert shards.manifest["examples"] == 15 and shards.manifest["parts"] == ["part-00000", "part-00001",
                                                                                "part-00002"]
    assert shards[3][0].tolist() == Shards(out / "part-00000")[3][0].tolist()
    assert shards[11][1].tolist() == Shards(out / "part-00002")[0][1].tolist()
    with pytest.raises(IndexError):
        shards[15]
    # a part finished while a reader is open is picked up by refresh, a lower-numbered one too (two builders finish
    # out of order); the examples already open keep their indices
    data.build_parts(cfg, out, 1, first=4, progress=False, lm=smol)
    assert shards.refresh() == 1 and len(shards) == 19
    data.build_parts(cfg, out, 1, first=3, progress=False, lm=smol)
    assert shards.refresh() == 1 and len(shards) == 23 and shards.refresh() == 0
    assert shards.manifest["parts"] == ["part-00000", "part-00001", "part-00002", "part-00004", "part-00003"]
    assert shards[11][1].tolist() == Shards(out / "part-00002")[0][1].tolist()
    assert shards[19][1].tolist() == Shards(out / "part-00003")[0][1].tolist()


def test_parts_refuse_a_single_data_directory(smol, built):
    with pytest.raises(CanvasError, match="not a directory of parts"):
        data.build_parts(config({"kind": "jsonl", "paths": ["x.jsonl"]}), built, 1, progress=False, lm=smol)


def test_bad_part_counts_are_refused(no_model_load, tmp_path):
    with pytest.raises(CanvasError, match="--parts must be >= 1"):
        data.build_parts(data.parse_config(config({"kind": "jsonl", "paths": ["x.jsonl"]})), tmp_path / "p", 0,
                         progress=False)
