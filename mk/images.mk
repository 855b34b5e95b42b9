# Container images (serving/Dockerfile, operator/Dockerfile) built with Docker; included from the Makefile.
#   make base-image                       the local Debian bookworm + Python 3.11 base (cached)
#   make images [REGISTRY=...] [BASE_IMAGE=python:3.11-slim]
#   make images push REGISTRY=registry.example.com/team
# REGISTRY defaults to kubeinfer.local (images loaded straight into a node, never pulled);
# BASE_IMAGE defaults to "local" (make base-image). Docker is installed and dockerd started
# when missing (images/ensure-docker.sh says so).
REGISTRY ?= kubeinfer.local
BASE_IMAGE ?= local
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
SERVING_IMAGE := $(REGISTRY)/kubeinfer-serving:$(VERSION)
OPERATOR_IMAGE := $(REGISTRY)/kubeinfer-operator:$(VERSION)

.PHONY: base-image images push

base-image:
	@images/base-image.sh

images:
	@REGISTRY=$(REGISTRY) BASE_IMAGE=$(BASE_IMAGE) images/build.sh operator serving

push: images
	@REGISTRY=$(REGISTRY) BASE_IMAGE=$(BASE_IMAGE) images/build.sh --push operator serving
