"""Snapshot calls of firecracker-python (PyPI), a Firecracker client library this project
did not write, against skiff. Usage:
  fc_client_snapshot.py create SOCKET STATE MEM   pause the VM and snapshot it
  fc_client_snapshot.py load SOCKET STATE MEM     load the snapshot and resume the VM"""
import sys

from firecracker.api import Api

what, sock, state, mem = sys.argv[1:5]
api = Api(sock)
if what == "create":
    api.vm.patch(state="Paused")
    api.create_snapshot.put(snapshot_type="Full", snapshot_path=state, mem_file_path=mem)
else:
    api.load_snapshot.put(
        snapshot_path=state,
        mem_backend={"backend_type": "File", "backend_path": mem},
        resume_vm=True,
    )
print(f"FC-CLIENT-OK {what} state={api.describe.get().json()['state']}")
api.close()
