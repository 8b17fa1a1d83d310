"""N concurrent request bodies of BODY_FILE on one HTTP/2 connection (prior
knowledge) to 127.0.0.1:PORT; prints how many got each status.

Usage: h2_bodies.py PORT N BODY_FILE   (needs the `h2` package: pip install h2)
"""
import sys, socket, time
import h2.connection, h2.config, h2.events
port, n = int(sys.argv[1]), int(sys.argv[2])
body = open(sys.argv[3], "rb").read()
s = socket.create_connection(("127.0.0.1", port))
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.initiate_connection(); s.sendall(c.data_to_send())
left, status, done = {}, {}, set()
for _ in range(n):
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, [(":method", "POST"), (":path", "/v1/chat/completions"), (":scheme", "http"),
                         (":authority", "127.0.0.1"), ("content-type", "application/json"),
                         ("content-length", str(len(body)))])
    left[sid] = 0
s.sendall(c.data_to_send())
s.settimeout(0.05)
t0 = time.time()
while len(done) < n and time.time() - t0 < 60:
    for sid, off in list(left.items()):
        if sid in done: continue
        while off < len(body):
            w = min(c.local_flow_control_window(sid), c.max_outbound_frame_size, len(body) - off)
            if w <= 0: break
            c.send_data(sid, body[off:off + w], end_stream=(off + w == len(body))); off += w
        left[sid] = off
    s.sendall(c.data_to_send())
    try: d = s.recv(1 << 20)
    except socket.timeout: continue
    if not d: break
    for ev in c.receive_data(d):
        if isinstance(ev, h2.events.ResponseReceived): status[ev.stream_id] = dict(ev.headers)[b":status"].decode()
        elif isinstance(ev, h2.events.DataReceived): c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)): done.add(ev.stream_id); left.pop(ev.stream_id, None)
    s.sendall(c.data_to_send())
from collections import Counter
print(dict(Counter(status.values())), "in %.1fs" % (time.time() - t0))
