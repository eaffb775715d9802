"""Boots a guest through skiff's API with firecracker-python (PyPI), a Firecracker client
library this project did not write: its `Api` class speaks HTTP over the Unix socket with
requests-unixsocket. Usage: fc_client_boot.py SOCKET KERNEL ROOTFS BOOT_ARGS"""
import sys

from firecracker.api import Api

sock, kernel, rootfs, boot_args = sys.argv[1:5]
api = Api(sock)
print("version:", api.version.get().json())
api.machine_config.put(vcpu_count=1, mem_size_mib=256)
api.boot.put(kernel_image_path=kernel, boot_args=boot_args)
api.drive.put(drive_id="rootfs", path_on_host=rootfs, is_root_device=True, is_read_only=False)
api.actions.put(action_type="InstanceStart")
api.vm.patch(state="Paused")
assert api.describe.get().json()["state"] == "Paused"
api.vm.patch(state="Resumed")
state = api.describe.get().json()["state"]
print(f"FC-CLIENT-OK state={state}")
api.close()
