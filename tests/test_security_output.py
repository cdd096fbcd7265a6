"""Security (dashboard exposure, loopback-only local Ray, the Ray version pin, trusted run dirs) and quiet,
useful output (no warnings of our own, no library notices, progress lines instead of bars in a log file)."""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from raycap.config import RuntimeConfig, load_config
from raycap.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = re.compile(r"^(127\.|::1$|::ffff:127\.)")


def run_python(code: str, timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], text=True, timeout=timeout, env=env,
                          cwd=ROOT, **kw)


# -- 6. the dashboard -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "myhost.example.com"])
def test_public_dashboard_is_refused_without_the_opt_in(host):
    with pytest.raises(UserError) as e:
        load_config("world-demo", [f"runtime.dashboard_host='{host}'"])
    msg = str(e.value)
    assert msg.startswith("--set runtime.dashboard_host:") and "not a loopback address" in msg
    assert "allow_public_dashboard" in msg and "CVE-2023-48022" in msg
    cfg = load_config("world-demo", [f"runtime.dashboard_host='{host}'", "runtime.allow_public_dashboard=true"])
    assert cfg.runtime.dashboard_host == host


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.1.1"])
def test_loopback_dashboard_needs_nothing(host):
    assert RuntimeConfig(dashboard_host=host).dashboard_host == host


def test_public_dashboard_warns_at_start_what_it_exposes(monkeypatch, capsys):
    from raycap.runtime import resources

    seen = {}

    class Ctx:
        dashboard_url = "0.0.0.0:8300"
        address_info = {"node_ip_address": "127.0.0.1"}

    def fake_init(**kw):
        from ray._private import ray_constants

        seen.update(kw, loopback_env=os.environ.get(resources.LOOPBACK_ONLY_ENV),
                    cluster_flag=ray_constants.ENABLE_RAY_CLUSTER)
        return Ctx()
    monkeypatch.setattr(resources.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(resources.ray, "init", fake_init)
    monkeypatch.delenv(resources.LOOPBACK_ONLY_ENV, raising=False)
    rt = RuntimeConfig(dashboard_host="0.0.0.0", allow_public_dashboard=True, dashboard_port=8300)
    assert resources.start_ray(rt) == (True, "0.0.0.0:8300")
    err = capsys.readouterr().err
    assert "warning: runtime.dashboard_host=0.0.0.0" in err and "port 8300" in err and "run code" in err
    # the local Ray started with its node on loopback, and the switch is undone afterwards
    assert seen["loopback_env"] == "0" and seen["cluster_flag"] is False
    from ray._private import ray_constants

    assert resources.LOOPBACK_ONLY_ENV not in os.environ and ray_constants.ENABLE_RAY_CLUSTER is True
    assert seen["runtime_env"] == resources.JOB_RUNTIME_ENV
    resources.start_ray(RuntimeConfig())
    assert "warning" not in capsys.readouterr().err


def test_ray_is_pinned_to_a_version_that_enforces_token_auth():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_dep = next(d for d in deps if d.startswith("ray["))
    version = tuple(int(x) for x in re.search(r">=\s*([\d.]+)", ray_dep).group(1).split("."))
    assert version >= (2, 59)


# -- 7. a local Ray listens on loopback only ------------------------------------------------------------------------


def test_local_ray_started_by_raycap_listens_on_loopback_only():
    """Start Ray through raycap's start_ray in a fresh process and list the listening sockets of that cluster's
    processes (the driver, and the GCS, raylet, dashboard, agents and workers of its session) with psutil."""
    out = run_python("""
        import json, os, socket
        import psutil, ray
        from raycap.config import RuntimeConfig
        from raycap.runtime.resources import start_ray

        s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
        owns, url = start_ray(RuntimeConfig(num_cpus=1, dashboard_port=port))

        @ray.remote
        def pid():
            return os.getpid()
        worker = ray.get(pid.remote())
        node = ray._private.worker._global_node
        session = os.path.basename(node.get_session_dir_path())
        procs = {psutil.Process(), psutil.Process(worker)}
        for p in psutil.process_iter():
            try:
                if session in " ".join(p.cmdline()):
                    procs |= {p, *p.children(recursive=True)}
            except psutil.Error:
                pass
        listen = []
        for p in procs:
            try:
                listen += [[p.pid, p.name(), c.laddr.ip, c.laddr.port] for c in p.net_connections("inet")
                           if c.status == psutil.CONN_LISTEN]
            except psutil.Error:
                pass
        print("RESULT", json.dumps({"owns": owns, "node_ip": node.node_ip_address, "listen": listen}))
        ray.shutdown()
    """)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(line[len("RESULT "):])
    assert result["owns"] and result["node_ip"] == "127.0.0.1"
    names = {name for _, name, _, _ in result["listen"]}
    assert {"gcs_server", "raylet"} <= names and len(result["listen"]) >= 5, result
    public = [x for x in result["listen"] if not LOOPBACK.match(x[2])]
    assert not public, f"listening off loopback: {public}"


# -- 8. run dirs are trusted input ------------------------------------------------------------------------------------


def test_docs_say_a_run_dir_is_trusted_input():
    from raycap.runtime.learner import Learner

    assert "trusted input" in Learner.load.__doc__ and "unpickle" in Learner.load.__doc__
    ray_section = (ROOT / "README.md").read_text().split("## The Ray runtime", 1)[1].split("\n## ", 1)[0]
    assert "run dir is trusted input" in ray_section and "unpickles" in ray_section


# -- 9. quiet, useful output ----------------------------------------------------------------------------------


def test_flat_weights_from_a_read_only_array_load_without_a_warning():
    out = run_python("""
        import numpy as np, torch
        from raycap.runtime.weights import flat_weights, load_flat_weights
        torch.manual_seed(0)
        a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
        flat = flat_weights(a)
        flat.setflags(write=False)  # what ray.get returns from the object store
        load_flat_weights(b, flat)
        assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
        print("OK")
    """, timeout=120)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr
    assert "not writable" not in out.stderr and "Warning" not in out.stderr, out.stderr


def test_kv_cache_decoding_passes_an_attention_mask_without_changing_results():
    from transformers import GPT2Config, GPT2LMHeadModel

    from raycap.models.clipcap import ClipCap, ClipCapConfig

    torch.manual_seed(0)
    lm = dict(vocab_size=40, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=2,
              pad_token_id=0, initializer_range=0.2)
    m = ClipCap(ClipCapConfig(clip_dim=8, prefix_length=3, lm=lm, max_new_tokens=10)).eval()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    calls = []
    forward = m.lm.forward

    def spy(*a, **kw):
        if kw.get("input_ids") is not None:
            calls.append(kw.get("attention_mask"))
        return forward(*a, **kw)
    m.lm.forward = spy
    for kw in (dict(mode="greedy"), dict(mode="beam", num_beams=3),
               dict(mode="sample", generator=torch.Generator().manual_seed(2))):
        cached = m.generate(x, use_cache=True, **kw)
        if kw["mode"] == "sample":
            kw["generator"] = torch.Generator().manual_seed(2)
        plain = m.generate(x, use_cache=False, **kw)
        assert torch.equal(cached.tokens, plain.tokens)
        torch.testing.assert_close(cached.logprobs, plain.logprobs, atol=1e-5, rtol=1e-4)
    assert calls and all(mask is not None and bool(mask.all()) for mask in calls)
    assert isinstance(m.lm, GPT2LMHeadModel) and isinstance(m.lm.config, GPT2Config)


def test_progress_lines_in_a_log_file(capsys):
    from raycap.progress import LineProgress, progress

    bar = progress(range(3, 10), initial=3, total=10, desc="rl")  # stderr is captured: not a terminal
    assert isinstance(bar, LineProgress)
    for i in bar:
        bar.set_postfix(reward=f"{-i:.3f}")
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert lines[0].startswith("rl: 4/10 (40%)") and lines[-1].startswith("rl: 10/10 (100%)")
    assert lines[-1].endswith("reward=-9.000") and len(lines) <= 3


def test_local_run_output_is_lines_and_raises_no_warning_of_ours(tiny_world_dir, tmp_path):
    """A 2-step local-runtime run with stderr in a file: no carriage-return-joined bar line, a progress line,
    and no warning raised from raycap's own code (warnings.catch_warnings(record=True), every warning shown)."""
    log = tmp_path / "run.log"
    with log.open("w") as f:
        out = run_python(f"""
            import json, warnings
            from pathlib import Path
            import raycap
            from raycap.train import main
            root = str(Path(raycap.__file__).parent)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                main(["--config", "world-demo", "--out", {str(tmp_path / 'run')!r}, "--runtime", "local",
                      "--set", "data.path={tiny_world_dir}", "--set", "retriever.path={tiny_world_dir}/retriever",
                      "--set", "captioner.path={tiny_world_dir}/captioner", "--set", "rl.steps=2",
                      "--set", "eval.images=100", "--set", "rl.sampling.max_new_tokens=8", "--set", "threads=2"])
            ours = [f"{{w.filename}}:{{w.lineno}}: {{w.message}}" for w in caught if w.filename.startswith(root)]
            print("OURS", json.dumps(ours))
        """, stdout=f, stderr=subprocess.STDOUT)
    text = log.read_text()
    assert out.returncode == 0, text[-3000:]
    assert "\r" not in text, [x[:200] for x in text.splitlines() if "\r" in x]
    assert max(len(x) for x in text.splitlines()) < 2000
    assert re.search(r"^rl: 2/2 \(100%\)", text, re.M)
    ours = json.loads(next(x for x in text.splitlines() if x.startswith("OURS "))[5:])
    assert ours == []


NOTICES = ["Token authentication is enabled", "Setting accelerator to CPU", "No CUDA runtime is found",
           "attention_mask", "not writable", "Loading weights", "Writing model shards", "built successfully"]


def test_ray_run_output_has_no_harmless_library_notices(printed_ray_run):
    """The Ray run a newcomer tries first (`raycap train` on Ray, the shared run of conftest.py): none of the
    notices that read as failures, and no carriage-return progress bars."""
    _, out = printed_ray_run
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "\r" not in text
    found = [n for n in NOTICES if n in text]
    assert not found, [x for x in text.splitlines() if any(n in x for n in found)]


def test_a_second_local_ray_takes_a_free_dashboard_port_when_the_default_is_in_use():
    """What a user saw when another Ray (or raycap run) held port 8265: Ray's traceback ("Failed to bind to
    127.0.0.1:8265 because it's already occupied"). Now a real second start takes a free port (the dashboard address
    the run prints is Ray's own); a port the config set that is in use is one line."""
    proc = run_python("""
        import json, socket
        import ray
        from raycap.config import RuntimeConfig
        from raycap.errors import UserError
        from raycap.runtime.resources import start_ray

        holder = socket.socket(); holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            holder.bind(("127.0.0.1", 8265)); holder.listen()
        except OSError:
            pass  # something else holds 8265 already: the case under test either way
        taken = socket.socket(); taken.bind(("127.0.0.1", 0)); taken.listen()
        try:
            start_ray(RuntimeConfig(num_cpus=1, dashboard_port=taken.getsockname()[1]))
            refused = None
        except UserError as e:
            refused = str(e)
        owns, url = start_ray(RuntimeConfig(num_cpus=1))
        ray.shutdown()
        print(json.dumps({"owns": owns, "url": url, "refused": refused, "explicit": taken.getsockname()[1]}))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["owns"] and got["url"].startswith("127.0.0.1:") and not got["url"].endswith(":8265"), got
    assert got["refused"] == (f"runtime.dashboard_port {got['explicit']}: 127.0.0.1:{got['explicit']} is in use "
                              "(another Ray or raycap run?); give a free port, or leave it unset to take one")
