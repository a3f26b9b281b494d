"""Call cinderblock's CSI endpoint from Python with grpcio: GetPluginInfo.

    pip install grpcio grpcio-tools
    python3 examples/python/plugin_info.py unix:///tmp/cinderblock-demo/csi.sock

The one line to know is the channel option `grpc.default_authority`.
Since grpcio 1.57, a Python client sends the socket's path as the HTTP/2
`:authority` on a unix socket (Java and Swift clients do the same). That is
not a valid authority, and cinderblock's HTTP/2 server (Rust's h2, under
tonic) rejects every such call with RST_STREAM PROTOCOL_ERROR before any
of cinderblock's code sees it. Go clients (the kubelet, the CSI sidecars)
send "localhost" and work. So: set the authority to "localhost".
"""

import atexit
import importlib
import pathlib
import shutil
import sys
import tempfile

import grpc
from grpc_tools import protoc

REPO = pathlib.Path(__file__).resolve().parents[2]


def load_csi_stubs():
    """Generate csi_pb2 and csi_pb2_grpc from proto/csi.proto into a temporary folder."""
    out = tempfile.mkdtemp(prefix="cinderblock-csi-py-")
    # The modules are loaded by then; the folder is not needed after exit.
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    include = pathlib.Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    rc = protoc.main([
        "grpc_tools.protoc",
        f"-I{REPO / 'proto'}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        str(REPO / "proto" / "csi.proto"),
    ])
    if rc != 0:
        raise SystemExit(f"protoc failed ({rc})")
    sys.path.insert(0, out)
    return importlib.import_module("csi_pb2"), importlib.import_module("csi_pb2_grpc")


def main():
    if len(sys.argv) < 2:
        raise SystemExit("usage: plugin_info.py unix:///path/to/csi.sock [--default-authority]")
    target = sys.argv[1]
    # --default-authority: leave grpcio's own authority (the socket path), to
    # see the failure this example avoids.
    options = [] if "--default-authority" in sys.argv[2:] else [("grpc.default_authority", "localhost")]
    csi_pb2, csi_pb2_grpc = load_csi_stubs()
    with grpc.insecure_channel(target, options=options) as channel:
        identity = csi_pb2_grpc.IdentityStub(channel)
        try:
            info = identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=10)
        except grpc.RpcError as e:
            print(f"GetPluginInfo failed: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print(f"{info.name} {info.vendor_version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
