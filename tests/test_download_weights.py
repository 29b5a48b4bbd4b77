"""OpenAI's TensorFlow GPT-2 checkpoint -> GPTModel, downloaded from a local HTTP server.

A tiny random GPT-2 is written in OpenAI's layout (variables ``model/h0/attn/c_attn/w``
of shape [1, in, out], the seven files) and served by http.server with Range support,
so download, resume, retry and conversion all run offline.
"""

import gzip
import json
import os
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow")

# The tiny model and the equivalence check are shared with the HF tests (pytest puts tests/
# on sys.path; a conftest.py would be the other home for them).
import download_weights  # noqa: E402
from dataset import gpt2_bpe_files  # noqa: E402
from download_weights import (  # noqa: E402
    GPT2_FILES,
    TF_CHECKPOINT_FILES,
    download_and_save_gpt2,
    download_file,
    load_gpt2_params_from_tf_ckpt,
    load_weights_into_gpt,
)
from download_weights_hf import load_gpt2_hf  # noqa: E402
from engine.gpt2_params import gpt2_param_names  # noqa: E402
from model import GPTModel, load_checkpoint  # noqa: E402
from test_download_weights_hf import (  # noqa: E402
    CTX,
    EMB,
    HEADS,
    LAYERS,
    VOCAB,
    assert_same_model,
    our_cfg,
    random_hf_model,
)

DATA = "model.ckpt.data-00000-of-00001"
HPARAMS = {"n_vocab": VOCAB, "n_ctx": CTX, "n_embd": EMB, "n_head": HEADS, "n_layer": LAYERS}


def write_openai_checkpoint(hf_model, folder):
    """Write ``hf_model``'s weights as OpenAI did: TF1 variables under ``model/``."""
    state = hf_model.transformer.state_dict()
    graph = tf.Graph()
    with graph.as_default():
        variables = []
        for row in gpt2_param_names(LAYERS):
            value = state[row.hf].numpy()
            if row.is_conv1d:
                value = value[None]            # OpenAI's Conv1D weights are [1, in, out]
            variables.append(tf.compat.v1.Variable(value, name=f"model/{row.openai_tf}"))
        saver = tf.compat.v1.train.Saver(var_list=variables)
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, str(folder / "model.ckpt"))
    # Saver writes absolute paths; OpenAI's file names the checkpoint relative to itself
    (folder / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n'
                                       'all_model_checkpoint_paths: "model.ckpt"\n')
    (folder / "hparams.json").write_text(json.dumps(HPARAMS))
    encoder_json, vocab_bpe = gpt2_bpe_files()
    (folder / "encoder.json").write_bytes(encoder_json.read_bytes())
    (folder / "vocab.bpe").write_bytes(vocab_bpe.read_bytes())
    return {name: (folder / name).read_bytes() for name in GPT2_FILES}


@pytest.fixture(scope="module")
def openai_files(tmp_path_factory):
    """(hf model, {file name: bytes}) for the tiny random GPT-2, written once per module."""
    hf = random_hf_model(seed=1)
    folder = tmp_path_factory.mktemp("openai")
    files = write_openai_checkpoint(hf, folder)
    # TF reads it back by OpenAI's names, with OpenAI's [1, in, out] Conv1D shape
    assert tf.train.load_variable(str(folder / "model.ckpt"), "model/h0/attn/c_attn/w").shape \
        == (1, EMB, 3 * EMB)
    return hf, files


class FileServer(ThreadingHTTPServer):
    """Serves ``files`` ({url path: bytes}) and records every request.

    Paths in ``cut_once`` send their Content-Length but close after half the body (once),
    ``cut_always`` every time; ``fail_once`` answer 503 once; ``ignore_range`` answer 200
    to Range requests; ``wrong_range`` answer them with a range from byte 0; ``gzip`` send
    the body gzip-compressed with ``Content-Encoding: gzip`` whatever the client asked.
    A path asked for more than MAX_GETS times answers 404, so a client that loops
    forever fails its test instead of hanging it.
    """

    MAX_GETS = 30

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files, self.requests = {}, []
        self.cut_once, self.fail_once, self.ignore_range = set(), set(), set()
        self.cut_always, self.wrong_range, self.gzip = set(), set(), set()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def gets(self, suffix=""):
        return [(path, rng) for method, path, rng in self.requests
                if method == "GET" and path.endswith(suffix)]


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.server.requests.append(("HEAD", self.path, None))
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()

    def do_GET(self):
        server, rng = self.server, self.headers.get("Range")
        server.requests.append(("GET", self.path, rng))
        body = server.files.get(self.path)
        if body is None or len(server.gets(self.path)) > server.MAX_GETS:
            self.send_error(404)
            return
        if self.path in server.gzip:
            payload = gzip.compress(body)
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        if self.path in server.fail_once:
            server.fail_once.discard(self.path)
            self.send_error(503)
            return
        start = 0
        if rng and self.path not in server.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.path in server.wrong_range:
                start = 0                      # a buggy server or cache: the wrong bytes
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.path in server.cut_once or self.path in server.cut_always:
            server.cut_once.discard(self.path)
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True       # hang up mid-body
            return
        self.wfile.write(payload)


@pytest.fixture(scope="module")
def module_server():
    server = FileServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def server(module_server):
    module_server.requests.clear()
    return module_server


def publish(server, openai_files, prefix, **replace):
    """Serve the seven files under ``{server.url}/{prefix}/124M/``; returns the base_url."""
    _, files = openai_files
    for name, data in {**files, **replace}.items():
        server.files[f"/{prefix}/124M/{name}"] = data
    return f"{server.url}/{prefix}"


# ---------------------------------------------------------------------------------------

def test_download_convert_matches_hf_and_second_call_downloads_nothing(
        tmp_path, server, openai_files):
    hf, files = openai_files
    base_url = publish(server, openai_files, "good")
    pth = download_and_save_gpt2("gpt2-small (124M)", target_dir=tmp_path, base_url=base_url)
    assert sorted(p.name for p in (tmp_path / "124M").iterdir()) == sorted(GPT2_FILES)
    for name in GPT2_FILES:
        assert (tmp_path / "124M" / name).read_bytes() == files[name]
    gpt = load_checkpoint(pth)
    assert gpt.cfg == our_cfg()                          # shape from hparams.json
    assert gpt.out_head.weight is gpt.tok_emb.weight
    assert_same_model(gpt, hf)

    # the Hugging Face path gives the very same model
    hf.save_pretrained(tmp_path / "hf")
    via_hf = load_gpt2_hf(tmp_path / "hf").state_dict()
    for name, tensor in gpt.state_dict().items():
        torch.testing.assert_close(tensor, via_hf[name], atol=0, rtol=0)

    server.requests.clear()
    assert download_and_save_gpt2("124M", target_dir=tmp_path, base_url=base_url) == pth
    assert server.requests == []


def test_download_cut_mid_file_resumes_with_range(tmp_path, server, openai_files):
    _, files = openai_files
    base_url = publish(server, openai_files, "cut")
    server.cut_once.add(f"/cut/124M/{DATA}")
    pth = download_and_save_gpt2("124M", target_dir=tmp_path, base_url=base_url)
    first, second = server.gets(DATA)
    assert first[1] is None
    # resumed where the written bytes end: at most the half that was sent (the chunk being
    # read when the connection dropped is lost), and not from zero
    resumed_at = int(second[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= len(files[DATA]) // 2
    assert (tmp_path / "124M" / DATA).read_bytes() == files[DATA]
    assert not list((tmp_path / "124M").glob("*.part"))
    load_checkpoint(pth)

    server.requests.clear()
    download_and_save_gpt2("124M", target_dir=tmp_path, base_url=base_url)
    assert server.gets() == []


def test_partial_file_is_resumed_not_trusted(tmp_path, server, openai_files):
    _, files = openai_files
    base_url = publish(server, openai_files, "good")
    dest = tmp_path / DATA
    third = len(files[DATA]) // 3
    (tmp_path / f"{DATA}.part").write_bytes(files[DATA][:third])
    download_file(f"{base_url}/124M/{DATA}", dest)
    assert server.gets(DATA) == [(f"/good/124M/{DATA}", f"bytes={third}-")]
    assert dest.read_bytes() == files[DATA]
    assert not (tmp_path / f"{DATA}.part").exists()


def test_server_that_ignores_range_restarts_from_zero(tmp_path, server, openai_files):
    _, files = openai_files
    base_url = publish(server, openai_files, "norange")
    server.ignore_range.add(f"/norange/124M/{DATA}")
    (tmp_path / f"{DATA}.part").write_bytes(b"stale bytes of another file")
    download_file(f"{base_url}/124M/{DATA}", tmp_path / DATA)
    assert (tmp_path / DATA).read_bytes() == files[DATA]


def test_complete_part_file_is_finished_by_a_416(tmp_path, server, openai_files):
    _, files = openai_files
    base_url = publish(server, openai_files, "good")
    (tmp_path / f"{DATA}.part").write_bytes(files[DATA])
    download_file(f"{base_url}/124M/{DATA}", tmp_path / DATA)
    assert (tmp_path / DATA).read_bytes() == files[DATA]
    # a .part longer than the file is not ours: start again
    (tmp_path / "x.part").write_bytes(files[DATA] + b"junk")
    download_file(f"{base_url}/124M/{DATA}", tmp_path / "x", backoff=0.01)
    assert (tmp_path / "x").read_bytes() == files[DATA]


def test_server_errors_are_retried(tmp_path, server, openai_files):
    _, files = openai_files
    base_url = publish(server, openai_files, "flaky")
    server.fail_once.add(f"/flaky/124M/{DATA}")
    download_file(f"{base_url}/124M/{DATA}", tmp_path / DATA, backoff=0.01)
    assert len(server.gets(DATA)) == 2
    assert (tmp_path / DATA).read_bytes() == files[DATA]


def test_unreachable_server_gives_up_with_clear_error(tmp_path, capsys):
    with socket.socket() as s:          # a port that was free a moment ago: nobody listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(download_weights.DownloadError, match="failed 3 times"):
        download_file(f"http://127.0.0.1:{port}/x", tmp_path / "x", retries=2, backoff=0.01)
    # every retry is announced, instead of a silence of backoff * (2^retries - 1) seconds
    retries = [line for line in capsys.readouterr().err.splitlines() if "; retry " in line]
    assert [line.rsplit("; ", 1)[1] for line in retries] == ["retry 1 of 2 in 0.01 s",
                                                             "retry 2 of 2 in 0.02 s"]
    assert all(line.startswith("x: ") and "Connection refused" in line for line in retries)


def test_gzip_encoded_answer_is_refused_at_once(tmp_path, server, openai_files):
    # We ask for identity; a server that compresses anyway gives a body whose decoded
    # length cannot match Content-Length. This used to restart forever without a pause.
    # (encoder.json shrinks to a third, so the decoded body overran Content-Length.)
    base_url = publish(server, openai_files, "gzip")
    server.gzip.add("/gzip/124M/encoder.json")
    with pytest.raises(download_weights.DownloadError,
                       match=r"encoder\.json was sent with Content-Encoding: gzip.*identity"):
        download_file(f"{base_url}/124M/encoder.json", tmp_path / "encoder.json",
                      retries=2, backoff=0.01)
    assert len(server.gets("encoder.json")) == 1
    assert list(tmp_path.iterdir()) == []


def test_starting_again_counts_against_retries(tmp_path, server, openai_files):
    # Every plain GET is cut mid-body (progress, so not a failure) and every resume gets
    # the wrong range (the .part is thrown away): without counting the start-agains
    # this alternated forever.
    base_url = publish(server, openai_files, "broken")
    server.cut_always.add(f"/broken/124M/{DATA}")
    server.wrong_range.add(f"/broken/124M/{DATA}")
    with pytest.raises(download_weights.DownloadError,
                       match=r"start again from zero 3 times.*sent bytes from 0 when asked"):
        download_file(f"{base_url}/124M/{DATA}", tmp_path / DATA, retries=2, backoff=0.01)
    assert len(server.gets(DATA)) == 6              # 3 x (plain GET cut, wrong resume)
    assert not (tmp_path / DATA).exists()


def test_404_names_url_and_suspects(tmp_path, server):
    with pytest.raises(FileNotFoundError, match=r"/missing/124M/checkpoint.*model size.*base_url"):
        download_and_save_gpt2("124M", target_dir=tmp_path, base_url=f"{server.url}/missing")


def test_bad_model_size_lists_choices(tmp_path):
    with pytest.raises(ValueError, match=r"'124M'.*'gpt2-xl \(1558M\)'"):
        download_and_save_gpt2("125M", target_dir=tmp_path, base_url="http://127.0.0.1:9")


def test_tampered_tf_data_file_gives_clear_error(tmp_path, server, openai_files):
    _, files = openai_files
    garbage = bytes(b ^ 0x5A for b in files[DATA])            # same size, wrong bytes
    base_url = publish(server, openai_files, "tampered", **{DATA: garbage})
    with pytest.raises(ValueError, match="delete the folder"):
        download_and_save_gpt2("124M", target_dir=tmp_path, base_url=base_url)
    assert not (tmp_path / "gpt2-124M.pth").exists()


def test_broken_pth_is_converted_again_without_downloading(tmp_path, server, openai_files):
    hf, _ = openai_files
    base_url = publish(server, openai_files, "good")
    pth = download_and_save_gpt2("124M", target_dir=tmp_path, base_url=base_url)
    pth.write_bytes(pth.read_bytes()[:1000])                  # a crash mid-copy, say
    server.requests.clear()
    assert download_and_save_gpt2("124M", target_dir=tmp_path, base_url=base_url) == pth
    assert server.requests == []
    assert_same_model(load_checkpoint(pth), hf)


def test_delete_tf_files_and_command_line(tmp_path, server, openai_files):
    hf, _ = openai_files
    base_url = publish(server, openai_files, "good")
    pth = download_weights.main(["--model", "gpt2-small (124M)", "--out-dir", str(tmp_path),
                                 "--base-url", base_url, "--delete-tf-files"])
    left = sorted(p.name for p in (tmp_path / "124M").iterdir())
    assert left == sorted(set(GPT2_FILES) - set(TF_CHECKPOINT_FILES))
    assert_same_model(load_checkpoint(pth), hf)


def test_delete_tf_files_also_when_already_converted(tmp_path, server, openai_files):
    hf, _ = openai_files
    base_url = publish(server, openai_files, "good")
    pth = download_and_save_gpt2("124M", target_dir=tmp_path, base_url=base_url)
    server.requests.clear()
    download_weights.main(["--model", "124M", "--out-dir", str(tmp_path), "--base-url",
                           base_url, "--delete-tf-files"])
    assert server.requests == []
    left = sorted(p.name for p in (tmp_path / "124M").iterdir())
    assert left == sorted(set(GPT2_FILES) - set(TF_CHECKPOINT_FILES))
    assert_same_model(load_checkpoint(pth), hf)


def test_more_blocks_than_n_layer_is_an_error(tmp_path, server, openai_files):
    # hparams.json says 2 blocks, the checkpoint holds 3: loading only 2 would be a
    # different model, silently
    base_url = publish(server, openai_files, "stale",
                       **{"hparams.json": json.dumps({**HPARAMS, "n_layer": 2}).encode()})
    with pytest.raises(ValueError, match=r"holds 3 transformer blocks but hparams\.json "
                                         r"says n_layer=2"):
        download_and_save_gpt2("124M", target_dir=tmp_path, base_url=base_url)
    assert not (tmp_path / "gpt2-124M.pth").exists()
    params = load_gpt2_params_from_tf_ckpt(tmp_path / "124M", HPARAMS)
    with pytest.raises(ValueError, match=r"holds 3 transformer blocks.*n_layer=2"):
        load_weights_into_gpt(GPTModel({**our_cfg(), "n_layers": 2}), params)


def test_params_dict_and_shape_errors(tmp_path, server, openai_files):
    base_url = publish(server, openai_files, "good")
    download_and_save_gpt2("124M", target_dir=tmp_path, base_url=base_url)
    params = load_gpt2_params_from_tf_ckpt(tmp_path / "124M" / "model.ckpt", HPARAMS)
    assert set(params) == {row.openai_tf for row in gpt2_param_names(LAYERS)}
    assert params["h0/attn/c_attn/w"].shape == (EMB, 3 * EMB)       # leading 1 squeezed
    assert params["wte"].shape == (VOCAB, EMB)

    bad = dict(params, **{"h1/mlp/c_proj/w": params["h1/mlp/c_proj/w"][:-1]})
    with pytest.raises(ValueError, match=r"trf_blocks\.1\.ff\.proj\.weight"):
        load_weights_into_gpt(GPTModel(our_cfg()), bad)
    with pytest.raises(ValueError, match="qkv_bias=True"):
        load_weights_into_gpt(GPTModel(our_cfg(qkv_bias=False)), params)
    # an untied model gets GPT-2's head, the embedding, as its own matrix
    untied = load_weights_into_gpt(GPTModel(our_cfg(tie=False)), params)
    torch.testing.assert_close(untied.out_head.weight, untied.tok_emb.weight)


def test_missing_tensorflow_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorflow", None)      # makes `import tensorflow` fail
    with pytest.raises(ImportError, match="pip install tensorflow"):
        load_gpt2_params_from_tf_ckpt(tmp_path / "model.ckpt", HPARAMS)


def test_a_host_name_that_does_not_resolve_fails_at_once(tmp_path, capsys):
    # Offline (or a mistyped host), retries cannot help: one line, no waiting, no .part file.
    # ".invalid" is reserved never to resolve (RFC 2606).
    with pytest.raises(download_weights.DownloadError,
                       match="host name 'gpt2-weights.invalid' does not resolve"):
        download_file("http://gpt2-weights.invalid/124M/checkpoint", tmp_path / "checkpoint",
                      backoff=30)
    assert "retry" not in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
