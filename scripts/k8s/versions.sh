# Pinned versions of the real Kubernetes parts the end-to-end test runs.
# Sourced by build.sh and testbed.sh; bump a version here and build.sh
# rebuilds just the binaries it feeds. Every one builds from the Go module
# proxy (see build.sh).
# shellcheck shell=bash disable=SC2034

ETCD_VERSION=v3.6.16          # go.etcd.io/etcd/server/v3
K8S_VERSION=v1.36.3           # k8s.io/kubernetes: kube-apiserver, kube-controller-manager, kubectl,
                              # kube-scheduler, kubelet, kube-proxy, e2e.test
K8S_STAGING_VERSION=v0.36.3   # its k8s.io/* staging modules, released in lockstep
PROVISIONER_VERSION=v6.4.0    # github.com/kubernetes-csi/external-provisioner/v6
SNAPSHOTTER_VERSION=v8.7.0    # github.com/kubernetes-csi/external-snapshotter/v8 (and client/v8: CRDs)
RESIZER_VERSION=v2.3.0        # github.com/kubernetes-csi/external-resizer/v2
ATTACHER_VERSION=v4.13.0      # github.com/kubernetes-csi/external-attacher/v4
HELM_VERSION=v4.3.1           # helm.sh/helm/v4
CONTAINERD_VERSION=v2.2.9     # github.com/containerd/containerd/v2: containerd, its runc shim, ctr
# node-driver-registrar and livenessprobe: the Go module proxy serves no
# version of kubernetes-csi/node-driver-registrar or livenessprobe (their v2
# tags lack a /v2 module path), so scripts/k8s/node-sidecars/ has our own,
# with the same flags and the same kubelet plugin-registration protocol.
# They build in the sidecars group; this is the version their images carry.
NODE_SIDECARS_VERSION=v0.1.0
# The two images of the e2e suite's "any volume data source" test: the
# proxy serves no version of kubernetes-csi/lib-volume-populator (whose
# example is hello-populator) or kubernetes-csi/volume-data-source-validator
# (403 "not available" for every tag), so scripts/k8s/populators/ has our
# own, built on client-go at SIDECARS_K8S_STAGING. These are the tags the
# suite's manifests ask for (test/e2e/testing-manifests/storage-csi/
# any-volume-datasource/), which their images carry.
HELLO_POPULATOR_VERSION=v1.0.1
DATA_SOURCE_VALIDATOR_VERSION=v1.0.0

# From Debian's packages (scripts/cluster.sh installs them with apt-get):
# runc, the CNI plugins (bridge, host-local, loopback, portmap), iptables and
# conntrack for kube-proxy, busybox for the test images, mmdebstrap for the
# cinderblock image's root filesystem. Whatever version the Debian release
# has (bookworm: runc 1.1.5, plugins 1.1.1, busybox 1.35).
DEBIAN_PARTS="runc containernetworking-plugins iptables conntrack busybox-static mmdebstrap"

# The k8s.io/* staging modules of the three sidecars, which build from one
# wrapper module (one dependency graph, compiled once). Upstream pins them
# apart: the provisioner replaces them with v0.36.1 (though it requires
# v0.37.0 and imports nothing from k8s.io/kubernetes), the snapshotter with
# v0.37.0, the resizer requires v0.37.1. The newest of those serves all three.
SIDECARS_K8S_STAGING=v0.37.1

# Where binaries, CRDs and wrapper modules go; an ignored folder of the repo
# unless K8S_TOOLS_DIR says otherwise (for example a folder that outlives a
# fresh clone).
k8s_repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
K8S_TOOLS_DIR=${K8S_TOOLS_DIR:-$k8s_repo_root/.tools/k8s}
K8S_BIN=$K8S_TOOLS_DIR/bin
K8S_CRDS=$K8S_TOOLS_DIR/crds
