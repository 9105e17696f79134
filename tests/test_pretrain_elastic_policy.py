"""The pure parts of alip.pretrain.elastic (the view an elastic restart or grow counts) and the
read task's lean imports. The policy itself runs in tests/test_pretrain_elastic.py on a real
simulated cluster (node loss, preemption notice, a returning node)."""
import socket
import subprocess
import sys

from alip.pretrain.elastic import raylet_reachable, reachable_nodes, usable_nodes

INF = float("-inf")


def test_usable_nodes_drop_dead_draining_and_young_nodes():
    reserved = {"a": {"CPU": 1}, "b": {"CPU": 1}, "c": {"CPU": 1}, "d": {"CPU": 1}}
    first_seen = {"a": INF, "b": INF, "c": 95.0, "d": 50.0}
    alive = {"a", "b", "c", "d"} - {"b"}
    # To restart: every live node that is not draining, young or not (one restart takes it).
    assert usable_nodes(reserved, alive, {"d"}, first_seen, now=100.0, min_uptime_s=None) == {
        "a": {"CPU": 1}, "c": {"CPU": 1}}
    # To grow: only nodes up for min_uptime_s (c joined 5 s ago: a flapping node costs nothing).
    assert usable_nodes(reserved, alive, set(), first_seen, now=100.0, min_uptime_s=30.0) == {
        "a": {"CPU": 1}, "d": {"CPU": 1}}
    # A node never seen before counts as just joined.
    assert usable_nodes({"e": {"CPU": 1}}, {"e"}, set(), {}, now=100.0, min_uptime_s=30.0) == {}


def test_a_raylet_that_refuses_is_not_reachable():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    assert raylet_reachable("127.0.0.1", port)
    server.close()  # the process is gone: the port refuses at once
    assert not raylet_reachable("127.0.0.1", port)
    nodes = [{"NodeID": "up", "Alive": True, "NodeManagerAddress": "127.0.0.1", "NodeManagerPort": port},
             {"NodeID": "gcs-knows", "Alive": False, "NodeManagerAddress": "127.0.0.1", "NodeManagerPort": port}]
    live = socket.socket()
    live.bind(("127.0.0.1", 0))
    live.listen()
    nodes[0]["NodeManagerPort"] = live.getsockname()[1]
    try:
        assert reachable_nodes(nodes) == {"up"}
    finally:
        live.close()


def test_the_read_task_imports_neither_open_clip_nor_the_model():
    """A read task's process imports alip.pretrain.decode: what it must not pull in is what made
    the first batch after every restart slow (import open_clip: ~5 s here)."""
    code = ("import sys\n"
            "from alip.pretrain.decode import _preprocessor\n"
            "prep = _preprocessor(32, 77, 0)\n"
            "tokens = prep._tokenize(['a photo of a cat', 'x ' * 100]).numpy()\n"
            "print(sorted(m for m in ('open_clip', 'alip.model', 'alip.pretrain.job') if m in sys.modules))\n"
            "import open_clip\n"
            "print(bool((open_clip.tokenize(['a photo of a cat', 'x ' * 100]).numpy() == tokens).all()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[]", "True"], out.stdout
