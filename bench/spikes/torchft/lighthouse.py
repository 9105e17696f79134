"""torchft lighthouse via the Python API (what Ray's LighthouseServerActor does), defaults unless overridden."""
import argparse
import time

from torchft.coordination import LighthouseServer

p = argparse.ArgumentParser()
p.add_argument("--bind", default="[::]:29510")
p.add_argument("--min-replicas", type=int, default=1)
p.add_argument("--heartbeat-timeout-ms", type=int, default=None)  # default 5000
p.add_argument("--join-timeout-ms", type=int, default=None)  # default 60000
args = p.parse_args()
kw = {}
if args.heartbeat_timeout_ms is not None:
    kw["heartbeat_timeout_ms"] = args.heartbeat_timeout_ms
if args.join_timeout_ms is not None:
    kw["join_timeout_ms"] = args.join_timeout_ms
lh = LighthouseServer(bind=args.bind, min_replicas=args.min_replicas, **kw)
print("LIGHTHOUSE", lh.address(), kw, flush=True)
while True:
    time.sleep(3600)
