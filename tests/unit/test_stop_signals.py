"""After a stop signal, the images are closed (L2 write-back, persistent bitmaps stored) with
the stop signals ignored: a second SIGTERM/SIGINT can't kill the process half-way through
the close, and none reaches asyncio's handler after the loop closed its wakeup pipe ("Exception
ignored when trying to write to the signal wakeup fd")."""
import subprocess
import sys

SCRIPT = r'''
import os, signal
from blockexport.exports.nbd_server import NbdServer

class Server(NbdServer):
    async def start(self):
        await super().start()
        os.kill(os.getpid(), signal.SIGTERM)        # the first stop signal

status = Server(persistent=True).run()
assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    os.kill(os.getpid(), sig)                       # arriving while the images close
print("closed after status", status)
'''

DAEMON_SCRIPT = r'''
import asyncio, os, signal
from blockexport.daemon import Daemon

async def main():
    d = Daemon()
    asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGTERM)
    status = await d.serve()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        os.kill(os.getpid(), sig)
    return status

print("closed after status", asyncio.run(main()))
'''


def _run(script):
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)


def test_nbd_server_ignores_stop_signals_while_closing():
    p = _run(SCRIPT)
    assert p.returncode == 0, p.stderr
    assert "closed after status 0" in p.stdout
    assert p.stderr == ""


def test_daemon_ignores_stop_signals_while_shutting_down():
    p = _run(DAEMON_SCRIPT)
    assert p.returncode == 0, p.stderr
    assert "closed after status 0" in p.stdout
    assert p.stderr == ""
