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


def test_a_local_copy_is_found_by_its_id_only_and_the_oldest_go(tmp_path, monkeypatch):
    import os

    from alip.pretrain.local_copy import LOCAL_COPY_DIR_ENV, drop_local_copies, find_local_copy, keep_local_copy

    monkeypatch.setenv(LOCAL_COPY_DIR_ENV, str(tmp_path / "copies"))
    ids = []
    for i in range(3):
        written = tmp_path / f"ckpt{i}" / "trainer.pt"
        written.parent.mkdir()
        written.write_bytes(b"state %d" % i)
        ids.append(keep_local_copy("run", str(written), keep=2))
        os.utime(written, ns=(i * 10**9, i * 10**9))  # distinct ages, oldest first
        written.unlink()  # Ray deletes its temporary directory after the upload
    assert find_local_copy("run", ids[0]) is None  # pruned: only the latest 2 are kept
    assert open(find_local_copy("run", ids[2]), "rb").read() == b"state 2"  # the link outlived the original
    assert find_local_copy("run", None) is None and find_local_copy("other-run", ids[2]) is None
    assert find_local_copy("run", "0" * 32) is None  # a checkpoint written on another node
    drop_local_copies("run")  # training is over: the disk is given back
    assert find_local_copy("run", ids[2]) is None and find_local_copy("run", ids[1]) is None
