# Test control plane built from Go modules (tests/cluster): etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kwok fake GPU nodes, kubectl and helm; with
# REAL_NODE=1 also a real node (kubelet, kube-proxy, containerd).
# Included from the Makefile. Binaries are cached in $(KUBEINFER_CACHE)/cluster-bin-<hash>
# and linked at .cache/cluster-bin; state (kubeconfig, logs) lives in .cluster/.
CLUSTER_DIR ?= .cluster
CLUSTER_NODES ?= 2
CLUSTER_BIN := .cache/cluster-bin

.PHONY: cluster-bin cluster cluster-down

cluster-bin:
	@KUBEINFER_CACHE=$(KUBEINFER_CACHE) tests/cluster/build.sh >/dev/null

# REAL_NODE=1 adds real-node-0 (containerd + kubelet + kube-proxy, needs root) with the images of
# `make images` loaded, so `helm install` and the examples run real pods.
REAL_NODE ?=
cluster: cluster-bin $(if $(REAL_NODE),images)
	@tests/cluster/up.sh --dir $(CLUSTER_DIR) --bin $(CLUSTER_BIN) --nodes $(CLUSTER_NODES) \
	  $(if $(REAL_NODE),--real-node --image $(SERVING_IMAGE) --image $(OPERATOR_IMAGE))
	@echo "export KUBECONFIG=$(abspath $(CLUSTER_DIR))/kubeconfig PATH=$(abspath $(CLUSTER_BIN)):\$$PATH"

cluster-down:
	@tests/cluster/down.sh --dir $(CLUSTER_DIR)
