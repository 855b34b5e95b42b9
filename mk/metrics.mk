# Metrics stack of the test cluster built from Go modules (tests/metrics-stack): Prometheus,
# promtool, KEDA's operator and metrics adapter, KEDA's CRDs. Included from the Makefile.
# Binaries are cached in $(KUBEINFER_CACHE)/metrics-bin-<hash> and linked at .cache/metrics-bin.
METRICS_BIN := .cache/metrics-bin

.PHONY: metrics-bin

metrics-bin:
	@KUBEINFER_CACHE=$(KUBEINFER_CACHE) tests/metrics-stack/build.sh >/dev/null
