"""Kill/rejoin spike. Scenario 'external': orchestrator SIGKILLs replica 1 at a random point.
Scenario 'midcollective': replica 1 SIGKILLs itself after joining the step's quorum, right before
its allgather, so replica 0 is blocked inside the allgather when the peer dies."""
import json, os, signal, subprocess, sys, time, statistics

scenario = sys.argv[1]
down_s = float(sys.argv[2]) if len(sys.argv) > 2 else 15.0
hb_ms = sys.argv[3] if len(sys.argv) > 3 else None
PY = os.environ.get("TFT_PYTHON", "/tmp/tft-venv/bin/python"); D = os.path.dirname(os.path.abspath(__file__)); L = os.environ.get("TFT_LOGS", "/tmp/tft-spike-logs") + f"/{scenario}" + (f"_hb{hb_ms}" if hb_ms else "") + os.environ.get("TAG", "")
os.makedirs(L, exist_ok=True)
for f in os.listdir(L): os.remove(os.path.join(L, f))
port = "29511"
lh_cmd = [PY, f"{D}/lighthouse.py", "--bind", f"[::]:{port}", "--min-replicas", "1"] + (["--heartbeat-timeout-ms", hb_ms] if hb_ms else [])
procs = {}
def start(name, cmd):
    procs[name] = subprocess.Popen(cmd, stdout=open(f"{L}/{name}.out", "a"), stderr=subprocess.STDOUT)
    return time.time()
def rep(i, extra=()):
    return [PY, f"{D}/replica.py", "--replica", str(i), "--lighthouse", f"http://localhost:{port}", "--log", f"{L}/replica_{i}.jsonl", *os.environ.get("REPLICA_EXTRA", "").split(), *extra]
def events(i):
    try: return [json.loads(l) for l in open(f"{L}/replica_{i}.jsonl")]
    except FileNotFoundError: return []
def wait_for(pred, limit):
    t = time.time()
    while time.time() - t < limit:
        if pred(): return True
        time.sleep(0.2)
    return False
marks = {}
start("lighthouse", lh_cmd); time.sleep(1.5)
marks["t_start"] = start("r0", rep(0)); start("r1", rep(1, ["--suicide-step", "15"] if scenario == "midcollective" else []))
ok = wait_for(lambda: sum(1 for e in events(0) if e.get("committed") and e["participants"] == 2) >= 10 and
              (scenario == "midcollective" or sum(1 for e in events(1) if e.get("committed")) >= 10), 180)
print("warm:", ok, flush=True)
if scenario == "external":
    procs["r1"].send_signal(signal.SIGKILL); marks["t_kill"] = time.time()
else:
    wait_for(lambda: procs["r1"].poll() is not None, 120)
    sui = [e for e in events(1) if e["event"] == "suicide"]
    marks["t_kill"] = sui[-1]["t"] if sui else time.time()
procs["r1"].wait()
time.sleep(down_s)
marks["t_restart"] = start("r1b", rep(1))
wait_for(lambda: any(e.get("committed") and e["pid"] == procs["r1b"].pid for e in events(1)), 180)
time.sleep(10)
for n in ("r0", "r1b", "lighthouse"):
    procs[n].send_signal(signal.SIGTERM)
for n in ("r0", "r1b", "lighthouse"):
    try: procs[n].wait(10)
    except subprocess.TimeoutExpired: procs[n].kill()
# ---- analysis
e0 = [e for e in events(0) if e["event"] == "step"]
e1b = [e for e in events(1) if e["pid"] == procs["r1b"].pid]
tk, tr = marks["t_kill"], marks["t_restart"]
ok0 = [e for e in e0 if e["committed"]]
before = [e for e in ok0 if e["t"] < tk]
gaps2 = [b["t"] - a["t"] for a, b in zip(before, before[1:]) if b["participants"] == 2]
after = [e for e in ok0 if e["t"] > tk]
failed = [e for e in e0 if not e["committed"] and tk < e["t"] < tr]
first_after = after[0] if after else None
rejoin2 = [e for e in ok0 if e["t"] > tr and e["participants"] == 2]
r1_started = next((e for e in e1b if e["event"] == "started"), None)
r1_first = next((e for e in e1b if e["event"] == "step" and e["committed"]), None)
gaps_rejoin = [b["t"] - a["t"] for a, b in zip(ok0, ok0[1:]) if b["t"] > tr and a["t"] < (rejoin2[0]["t"] if rejoin2 else tr + 60)]
res = {
    "scenario": scenario, "heartbeat_timeout_ms": hb_ms or "default(5000)",
    "normal_step_period_s_median": round(statistics.median(gaps2), 3) if gaps2 else None,
    "survivor_last_commit_before_kill_s_before": round(tk - before[-1]["t"], 3) if before else None,
    "survivor_first_commit_after_kill_s": round(first_after["t"] - tk, 3) if first_after else None,
    "survivor_first_commit_after_kill": {k: first_after[k] for k in ("step", "participants", "pg_size", "dur")} if first_after else None,
    "survivor_failed_steps_after_kill": [{k: e[k] for k in ("step", "errored", "dur", "participants")} for e in failed],
    "survivor_steps_committed_while_peer_down": sum(1 for e in ok0 if tk < e["t"] < tr),
    "restart_to_r1_started_s": round(r1_started["t"] - tr, 3) if r1_started else None,
    "restart_to_r1_first_commit_s": round(r1_first["t"] - tr, 3) if r1_first else None,
    "r1_first_commit": {k: r1_first[k] for k in ("step", "participants", "dur")} if r1_first else None,
    "restart_to_survivor_sees_2_participants_s": round(rejoin2[0]["t"] - tr, 3) if rejoin2 else None,
    "survivor_max_gap_during_rejoin_s": round(max(gaps_rejoin), 3) if gaps_rejoin else None,
    "survivor_steps_committed_between_restart_and_rejoin": sum(1 for e in ok0 if tr < e["t"] < (rejoin2[0]["t"] if rejoin2 else tr)),
}
print(json.dumps(res, indent=1))
json.dump(res, open(f"{L}/result.json", "w"), indent=1)
