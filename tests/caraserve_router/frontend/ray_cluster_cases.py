"""`--cluster ray` on a two-node Ray cluster on this machine (Ray's own `cluster_utils.Cluster`).

Run only inside a private network namespace with loopback alone (Ray binds the machine's
interface address otherwise): `test_ray_cluster.py` runs this file that way; by hand:
`unshare -n bash -c 'ip link set lo up; exec python -m pytest tests/.../ray_cluster_cases.py'`.

One front end, two instance actors of a tiny llama, one per node, round-robin routing (so where
each request goes is known), each instance running at most two requests, 1,000 adapters
registered (two real ones and 998 links to the first). In order: placement, disjoint cores,
the instance key, outputs against HF + PEFT, and only the used adapters' bytes shipped to an
actor; an adapter loaded from a directory only the front end was given; an instance's process
killed mid-run; a stopped (SIGSTOP) instance replaced; an instance removed and one added at run
time; the vLLM metric names in a scripted scenario; front ends attaching to the running
instances, the first one SIGKILLed; the instances reaped by scripts/ray_down.py.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import requests
import torch
from peft import PeftModel
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM

from caraserve_router.assets.demo_adapters import make_random_adapter
from caraserve_router.contracts.configs import parse_cores
from caraserve_router.evaluation.server_process import RunningServer, port_free
from tests import fixtures
from tests.testing import decisions, generate

if os.environ.get("CARASERVE_RAY_NETNS") != "1":
    pytest.skip("run through test_ray_cluster.py (inside a private network namespace)", allow_module_level=True)

ray = pytest.importorskip("ray")

PROMPTS = ([5, 6, 7, 8], [20, 3, 9])
NEW_TOKENS = 6
STRENGTH = 4.0  # adapters strong enough that every adapter's greedy tokens differ from the others'
REGISTERED = 1000  # adapters of --adapters: registered at start, shipped to an actor on use
KEY = "ray-cases-instance-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    model_dir, adapters = fixtures.tiny_llama_with_adapters(root / "given", ranks=(2, 8), strength=STRENGTH)
    late = make_random_adapter(model_dir, root / "front-only" / "late-r4", rank=4, seed=7, strength=STRENGTH)
    many = root / "many"
    many.mkdir()
    for adapter in adapters:
        (many / adapter.name).symlink_to(adapter, target_is_directory=True)
    for i in range(REGISTERED - len(adapters)):
        (many / f"bulk-{i:04d}").symlink_to(adapters[0], target_is_directory=True)
    return model_dir, adapters, late, many


@pytest.fixture(scope="module")
def nodes():
    """Two Ray nodes of one CPU each: instances asking one CPU each must go one per node."""
    from ray.cluster_utils import Cluster

    # Everything Ray writes goes under a private RAY_TMPDIR (cluster_utils writes its address file
    # under the default temp dir whatever temp_dir says); short: Ray's socket paths have a limit.
    base = os.environ.get("RAY_TMPDIR") or tempfile.mkdtemp(prefix="rayt_", dir="/tmp")
    os.environ["RAY_TMPDIR"] = base
    temp = os.path.join(base, "ray")
    os.makedirs(temp, exist_ok=True)
    cluster = Cluster()
    try:
        cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20, temp_dir=temp, include_dashboard=False)
        cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20)
        ray.init(address=cluster.address, namespace="caraserve", logging_level="WARNING")
        yield cluster, temp
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tiny, nodes, tmp_path_factory):
    model_dir, adapters, late, many = tiny
    logs = tmp_path_factory.mktemp("ray-logs")
    srv = RunningServer("caraserve_router.api_server", [
        "--cluster", "ray", "--ray-address", nodes[0].address, "--instances", "2", "--model-dir", str(model_dir),
        "--adapters", str(many), "--adapter-roots", f"{many},{late.parent}",
        *FRONT_FLAGS, "--hung-after-s", "4", "--log-dir", str(logs)], logs / "server.log",
        startup_s=400, instance_key=KEY)
    with srv:
        yield srv


FRONT_FLAGS = ["--policy", "round-robin", "--running-max-req-size", "2", "--lora-mode", "pipeline",
               "--lora-pool-mb", "4", "--lora-max-rank", "8", "--sidecar-workers", "1",
               "--health-interval-s", "0.5", "--stats-interval-s", "0.3"]


def peft_greedy(model_dir, adapter, ids, n=NEW_TOKENS) -> list:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, len(ids):].tolist()


def instances(url) -> list:
    return requests.get(url + "/stats", timeout=30).json()["instances"]


def actor_infos() -> list:
    """info() of every live instance actor, by instance index."""
    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["namespace"] == "caraserve")
    infos = {}
    for name in names:
        index = int(name.split("-instance")[1].split("-")[0])
        try:
            info = ray.get(ray.get_actor(name, namespace="caraserve").info.remote(), timeout=30)
            if info["alive"]:  # a newer generation of an index replaces an older one
                infos[index] = info
        except ray.exceptions.RayActorError:
            pass
    return [infos[i] for i in sorted(infos)]


def test_one_instance_per_node_and_outputs_equal_peft(tiny, server, nodes):
    model_dir, adapters, _, _ = tiny
    infos = actor_infos()
    assert len(infos) == 2
    assert len({i["node_id"] for i in infos}) == 2, "spread placement: one instance per node"
    # 1,000 adapters registered in seconds, and no actor received any adapter's bytes at start
    [line] = [x for x in open(server.log_path).read().splitlines() if "adapter(s) of" in x]
    assert f"{REGISTERED} adapter(s)" in line and float(line.split(" registered in ")[1].split()[0]) < 5.0, line
    assert [i["staged"] for i in infos] == [{}, {}]
    # the two instances (one host here) run on disjoint cores: Ray reserved one CPU for each
    cores = [set(parse_cores(i["cores"])) for i in infos]
    assert all(len(c) == 1 for c in cores) and not cores[0] & cores[1], cores
    assert [os.sched_getaffinity(i["pid"]) for i in infos] == cores
    # an instance answers only the front end's key (here given in its environment) but on /health, /metrics
    for info in infos:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = requests.post(info["url"] + "/generate", json={"input_ids": [5], "parameters": {"max_new_tokens": 1}},
                              headers=headers, timeout=30)
            assert r.status_code == 401, r.text
            assert requests.post(info["url"] + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/"},
                                 headers=headers, timeout=30).status_code == 401
        assert requests.get(info["url"] + "/health", timeout=30).status_code == 200
        assert requests.get(info["url"] + "/metrics", timeout=30).status_code == 200
        # with the key, paths outside the actor's own adapter directory are refused (the roots)
        r = requests.post(info["url"] + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(
            adapters[0])}, headers=AUTH, timeout=30)
        assert r.status_code == 400 and "adapter root" in r.text, r.text
    alive_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert {i["node_id"] for i in infos} <= alive_nodes
    assert [h["url"] for h in instances(server.url)] == [i["url"] for i in infos]

    before = decisions(server.url)
    for adapter in [None] + adapters:
        name = adapter.name if adapter is not None else None
        expected = peft_greedy(model_dir, adapter, PROMPTS[0])
        # round-robin: consecutive requests go to instance0 and instance1 in turn; both agree with PEFT
        assert generate(server.url, PROMPTS[0], name, NEW_TOKENS)["token_ids"] == expected, name
        assert generate(server.url, PROMPTS[0], name, NEW_TOKENS)["token_ids"] == expected, name
    after = decisions(server.url)
    assert {k: after[k] - before.get(k, 0) for k in after} == {"instance0": 3.0, "instance1": 3.0}
    outs = {peft_greedy(model_dir, a, PROMPTS[0]).__repr__() for a in [None] + adapters}
    assert len(outs) == 3, "adapters must change the output, or the comparison proves nothing"
    # The two "nodes" are one host: its instances share one host copy of each adapter. (Each
    # instance is asked directly: the round robin above may skip one whose load looked full.)
    for h in instances(server.url):
        for adapter in adapters:
            r = requests.post(h["url"] + "/generate", json={"input_ids": PROMPTS[0], "adapter": adapter.name,
                              "parameters": {"max_new_tokens": 2, "return_details": True}}, timeout=300,
                              headers=AUTH)
            assert r.status_code == 200, r.text
            assert [t["id"] for t in r.json()["tokens"]] == peft_greedy(model_dir, adapter, PROMPTS[0], 2)
    residency = [requests.get(h["url"] + "/stats", headers=AUTH, timeout=30).json()["lora"]["residency"]
                 for h in instances(server.url)]
    assert sum(r["host_reads"] for r in residency) == 2, residency
    assert sum(r["host_shared_hits"] for r in residency) == 2, residency
    # only the two adapters used reached each actor, each once, whole
    sizes = {a.name: sum(f.stat().st_size for f in a.iterdir() if f.is_file()) for a in adapters}
    assert [i["staged"] for i in actor_infos()] == [sizes, sizes]


def test_adapter_from_a_directory_only_the_front_end_knows(tiny, server):
    model_dir, _, late, _ = tiny
    r = requests.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(late)},
                      timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["rank"] == 4
    for inst in instances(server.url):  # each instance registered its own copy, written on its node
        models = requests.get(inst["url"] + "/v1/models", headers=AUTH, timeout=30).json()["data"]
        [entry] = [m for m in models if m["id"] == "late"]
        assert entry["path"] != str(late) and not entry["path"].startswith(str(late.parent))
    expected = peft_greedy(model_dir, late, PROMPTS[1])
    before = decisions(server.url)
    assert [generate(server.url, PROMPTS[1], "late", NEW_TOKENS)["token_ids"] for _ in range(2)] == [expected, expected]
    after = decisions(server.url)
    assert {k: after[k] - before.get(k, 0) for k in after} == {"instance0": 1.0, "instance1": 1.0}
    # a path the front end cannot read is a clear 400, nothing is registered
    r = requests.post(server.url + "/v1/load_lora_adapter",
                      json={"lora_name": "nope", "lora_path": str(late.parent / "nope")}, timeout=60)
    assert r.status_code == 400 and "not a directory" in r.json()["error"]["message"]


def scrape(url) -> dict:
    out = {}
    for family in text_string_to_metric_families(requests.get(url + "/metrics", timeout=30).text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def stream(url, adapter, ids, n, results, key, started=None):
    body = {"input_ids": ids, "adapter": adapter, "parameters": {"max_new_tokens": n, "ignore_eos": True}}
    tokens, error = 0, None
    try:
        with requests.post(url, json=body, stream=True, timeout=300, headers=AUTH) as r:
            if r.status_code != 200:
                results[key] = ("http", r.status_code)
                return
            for line in r.iter_lines():
                if line.startswith(b"data:"):
                    event = json.loads(line[5:])
                    if "error" in event:
                        error = event["error"]["message"]
                    else:
                        tokens += 1
                        if started is not None and tokens == 1:
                            started.set()
        results[key] = ("error", error) if error else ("ok", tokens)
    except requests.RequestException as e:
        results[key] = ("exception", str(e))


def wait_for(predicate, timeout_s, what, show=None):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}" + (f": {show()}" if show else ""))


def restarted(old: list, index: int):
    """actor_infos() once instance `index` runs a new process that has bound its port, else None."""
    infos = actor_infos()
    if len(infos) == len(old) and infos[index]["pid"] != old[index]["pid"] and infos[index]["url"]:
        return infos
    return None


def test_killed_instance_is_restarted_by_ray(tiny, server):
    """Eight long requests: two run on each instance, four wait at the front end. Instance 1's
    process is killed: its two running requests end with an error event, the other six
    complete; Ray restarts the actor (new process and URL) and routing reaches it again."""
    old = actor_infos()
    results, threads = {}, []
    for key in range(8):
        t = threading.Thread(target=stream, args=(server.url + "/generate_stream", None, [30 + key, 4, 5], 600,
                                                  results, key))
        t.start()
        threads.append(t)
    # four running, each past its first tokens (so they have been streamed out), as the
    # instances themselves report it
    def running():
        return [r["generated"] for i in old for r in requests.get(i["url"] + "/stats", headers=AUTH,
                                                                   timeout=30).json()["running"]]

    wait_for(lambda: sum(g >= 3 for g in running()) == 4, 120, "four requests running", lambda: (results, running()))
    os.kill(old[1]["pid"], signal.SIGKILL)
    for t in threads:
        t.join(300)
        assert not t.is_alive(), "a request hung"
    kinds = sorted(r[0] for r in results.values())
    assert kinds.count("ok") == 6 and kinds.count("error") == 2, results
    assert all(r == ("ok", 600) for r in results.values() if r[0] == "ok")
    assert all("instance" in r[1] for r in results.values() if r[0] == "error")

    new = wait_for(lambda: restarted(old, 1), 120, "actor restarted")
    assert new[0]["pid"] == old[0]["pid"]
    view = wait_for(lambda: (lambda v: v if v[1]["healthy"] and v[1]["url"] == new[1]["url"] else None)(
        instances(server.url)), 300, "restarted instance healthy at its new URL")
    assert view[1]["restarts"] == 1
    # the restarted instance has the adapter loaded at run time (restored by the front end); the
    # start-up ones reach it on use, as on its first start
    wait_for(lambda: "late" in {m["id"] for m in requests.get(
        new[1]["url"] + "/v1/models", headers=AUTH, timeout=30).json()["data"]}, 60, "adapter restored")
    assert actor_infos()[1]["staged"].keys() == {"late"}
    before = decisions(server.url)
    for adapter in ("late", "late", "lora-r2-0", "lora-r2-0"):
        assert len(generate(server.url, PROMPTS[1], adapter, NEW_TOKENS)["token_ids"]) == NEW_TOKENS
    after = decisions(server.url)
    assert after["instance1"] - before.get("instance1", 0) == 2
    assert actor_infos()[1]["staged"].keys() == {"late", "lora-r2-0"}


def test_a_stopped_instance_is_replaced(tiny, server):
    """SIGSTOP: the process lives but answers nothing. The front end marks it down, routes the
    requests elsewhere, and after --hung-after-s has its actor kill it; Ray restarts the actor."""
    old = actor_infos()
    os.kill(old[1]["pid"], signal.SIGSTOP)
    try:
        wait_for(lambda: not instances(server.url)[1]["healthy"], 60, "the stopped instance marked down")
        before = decisions(server.url)
        for _ in range(2):
            assert len(generate(server.url, PROMPTS[0], None, NEW_TOKENS)["token_ids"]) == NEW_TOKENS
        after = decisions(server.url)
        assert {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)} == {"instance0": 2.0}
        new = wait_for(lambda: restarted(old, 1), 120, "the stopped instance replaced")
    finally:
        try:
            os.kill(old[1]["pid"], signal.SIGCONT)  # if it still exists (a failed test): let it die
        except ProcessLookupError:
            pass
    assert new[0]["pid"] == old[0]["pid"]
    wait_for(lambda: not os.path.exists(f"/proc/{old[1]['pid']}") or open(f"/proc/{old[1]['pid']}/stat").read()
             .rsplit(")", 1)[1].split()[0] == "Z", 30, "the stopped process gone")
    wait_for(lambda: (lambda v: v[1]["healthy"] and v[1]["url"] == new[1]["url"])(instances(server.url)), 300,
             "the replaced instance healthy")
    assert instances(server.url)[1]["restarts"] == 2
    cores = [set(parse_cores(i["cores"])) for i in new]
    assert not cores[0] & cores[1], cores


def test_instances_removed_and_added_at_run_time(tiny, server):
    model_dir, _, late, _ = tiny
    r = requests.delete(server.url + "/admin/instances/1?drain_s=5", timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["removed"] is True and r.json()["healthy"] is False
    assert [i["url"] for i in actor_infos()] == [instances(server.url)[0]["url"]], "instance 1's actor is gone"
    before = decisions(server.url)
    for _ in range(2):
        assert len(generate(server.url, PROMPTS[0], None, NEW_TOKENS)["token_ids"]) == NEW_TOKENS
    after = decisions(server.url)
    assert {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)} == {"instance0": 2.0}
    assert requests.delete(server.url + "/admin/instances/1", timeout=30).status_code == 409
    assert requests.delete(server.url + "/admin/instances/0", timeout=30).status_code == 409  # the last one

    r = requests.post(server.url + "/admin/instances", json={"count": 1}, timeout=120)
    assert r.status_code == 200, r.text
    [added] = r.json()["added"]
    assert added["index"] == 2 and added["name"] == "instance2"
    wait_for(lambda: requests.get(server.url + "/admin/instances", timeout=30).json()["instances"][2]["healthy"],
             300, "the added instance healthy")
    url = instances(server.url)[2]["url"]
    wait_for(lambda: "late" in {m["id"] for m in requests.get(url + "/v1/models", headers=AUTH,
                                                              timeout=30).json()["data"]}, 60,
             "the run-time adapter restored on the added instance")
    expected = peft_greedy(model_dir, late, PROMPTS[1])
    before = decisions(server.url)
    assert [generate(server.url, PROMPTS[1], "late", NEW_TOKENS)["token_ids"] for _ in range(2)] == [expected, expected]
    after = decisions(server.url)
    assert {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)} == {
        "instance0": 1.0, "instance2": 1.0}


def test_instance_metrics_speak_vllm(tiny, server):
    """Straight to instance 0 (max two running): a, b run, a third request (the base model)
    and a fourth (c) wait; the vLLM series say exactly that, then go back to idle. (Last before
    shutdown: the front end adopts requests it did not send into its view of the instance and
    keeps them there, so routing to instance 0 is off afterwards.)"""
    _, adapters, _, _ = tiny
    url = instances(server.url)[0]["url"]
    results, threads = {}, []
    plan = [("lora-r2-0", 1500), ("lora-r8-1", 1500), (None, 4), ("late", 4)]
    for key, (adapter, n) in enumerate(plan):
        t = threading.Thread(target=stream, args=(url + "/generate_stream", adapter, [7, 8, 9], n, results, key))
        t.start()
        threads.append(t)
        if key < 2:
            wait_for(lambda: len(scrape(url)["vllm:num_requests_running"]) and
                     scrape(url)["vllm:num_requests_running"][0][1] == key + 1, 60, f"request {key} running")
    got = wait_for(lambda: (lambda m: m if m["vllm:num_requests_waiting"][0][1] == 2 else None)(scrape(url)), 60,
                   "two waiting")
    assert got["vllm:num_requests_running"][0][1] == 2
    [(labels, stamp)] = got["vllm:lora_requests_info"]
    assert labels["running_lora_adapters"] == "lora-r2-0,lora-r8-1"
    assert labels["waiting_lora_adapters"] == "late"  # the base-model request names no adapter
    assert int(labels["max_lora"]) >= 1 and abs(stamp - time.time()) < 60
    assert set(labels["resident_lora_adapters"].split(",")) >= {"lora-r2-0", "lora-r8-1"}
    stats = requests.get(url + "/stats", headers=AUTH, timeout=30).json()
    assert int(labels["max_lora"]) == stats["lora"]["pages_total"] // 8
    assert 0 < got["vllm:kv_cache_usage_perc"][0][1] <= 1
    for t in threads:
        t.join(300)
    assert [results[k][0] for k in range(4)] == ["ok"] * 4, results
    idle = scrape(url)
    assert idle["vllm:num_requests_running"][0][1] == 0 and idle["vllm:num_requests_waiting"][0][1] == 0
    assert idle["vllm:kv_cache_usage_perc"][0][1] == 0
    [(labels, _)] = idle["vllm:lora_requests_info"]
    assert labels["running_lora_adapters"] == "" and labels["waiting_lora_adapters"] == ""


def own_processes(marker: str) -> list:
    out = subprocess.run(["ps", "-eww", "-o", "pid=,args="], capture_output=True, text=True).stdout  # ww: whole lines
    return [line for line in out.splitlines() if marker in line and "ps -eww" not in line]


def attached(nodes, tiny, logs, name) -> RunningServer:
    """Another front end, serving the instances running in the namespace (key from Ray's KV)."""
    return RunningServer("caraserve_router.api_server", [
        "--cluster", "ray", "--ray-address", nodes[0].address, "--ray-attach", "--model-dir", str(tiny[0]),
        "--adapters", str(tiny[3]), *FRONT_FLAGS, "--log-dir", str(logs)], logs / f"{name}.log", startup_s=120)


def test_front_ends_attach_and_outlive_each_other(tiny, server, nodes, tmp_path):
    """A second front end attaches and both serve; the first is SIGKILLed and its instances
    keep running (same processes); a third attaches within 60 s and serves them too."""
    old = actor_infos()
    urls = [i["url"] for i in requests.get(server.url + "/admin/instances", timeout=30).json()["instances"]
            if not i["removed"]]
    assert len(urls) == 2
    with attached(nodes, tiny, tmp_path, "second") as second:
        assert [i["url"] for i in instances(second.url)] == urls
        for url in (server.url, second.url):
            assert len(generate(url, PROMPTS[0], "lora-r8-1", NEW_TOKENS)["token_ids"]) == NEW_TOKENS
        server.proc.kill()  # SIGKILL: no clean-up at all
        server.proc.wait()
        time.sleep(3)
        assert [(i["pid"], i["actor_pid"]) for i in actor_infos()] == [(i["pid"], i["actor_pid"]) for i in old]
        assert len(generate(second.url, PROMPTS[0], None, NEW_TOKENS)["token_ids"]) == NEW_TOKENS
        start = time.time()
        with attached(nodes, tiny, tmp_path, "third") as third:
            assert len(generate(third.url, PROMPTS[0], "lora-r2-0", NEW_TOKENS)["token_ids"]) == NEW_TOKENS
            took = time.time() - start
            assert took < 60, f"attached and served in {took:.0f} s"
            assert len(generate(second.url, PROMPTS[0], "lora-r2-0", NEW_TOKENS)["token_ids"]) == NEW_TOKENS
            assert [i["url"] for i in instances(third.url)] == urls
        print(f"third front end attached and served in {took:.1f} s")
    # attached front ends leave the instances running when they exit
    assert [i["pid"] for i in actor_infos()] == [i["pid"] for i in old]


def test_ray_down_reaps_the_instances(tiny, server, nodes):
    model_dir = str(tiny[0])
    urls = [i["url"] for i in actor_infos()]
    assert urls and own_processes(model_dir)
    out = subprocess.run([sys.executable, "scripts/ray_down.py", "--address", nodes[0].address, "--namespace",
                          "caraserve"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "stopped 2 instance actor(s)" in out.stdout, out.stdout + out.stderr
    server.stop()
    assert [s for s in server.leftover_shm if s.startswith("caraserve_r")] == []
    wait_for(lambda: not own_processes(model_dir), 30, "instance processes gone")
    for url in urls:
        assert port_free(int(url.rsplit(":", 1)[1]))
    assert not [n for n in ray.util.list_named_actors(all_namespaces=True) if n["namespace"] == "caraserve"]
    cluster, temp = nodes
    ray.shutdown()
    cluster.shutdown()
    wait_for(lambda: not own_processes(temp), 30, "Ray processes gone")
    shutil.rmtree(temp, ignore_errors=True)
