// Command etcd runs a single-member etcd server for the test control plane.
//
// It embeds go.etcd.io/etcd/server/v3/embed (the same etcd release that
// k8s.io/kubernetes requires), listens on loopback only, and exits when it
// receives SIGINT or SIGTERM or when the server stops on its own.
package main

import (
	"flag"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"go.etcd.io/etcd/server/v3/embed"
)

func mustURL(raw string) url.URL {
	u, err := url.Parse(raw)
	if err != nil {
		log.Fatalf("invalid URL %q: %v", raw, err)
	}
	return *u
}

func main() {
	dataDir := flag.String("data-dir", "", "directory for the member's WAL and snapshots (required)")
	clientURL := flag.String("listen-client-url", "http://127.0.0.1:2379", "URL that serves the client API")
	peerURL := flag.String("listen-peer-url", "http://127.0.0.1:2380", "URL that serves peer traffic")
	flag.Parse()
	if *dataDir == "" {
		log.Fatal("--data-dir is required")
	}

	cfg := embed.NewConfig()
	cfg.Name = "kubeinfer-test"
	cfg.Dir = *dataDir
	cfg.LogLevel = "warn"
	client, peer := mustURL(*clientURL), mustURL(*peerURL)
	cfg.ListenClientUrls = []url.URL{client}
	cfg.AdvertiseClientUrls = []url.URL{client}
	cfg.ListenPeerUrls = []url.URL{peer}
	cfg.AdvertisePeerUrls = []url.URL{peer}
	cfg.InitialCluster = cfg.Name + "=" + peer.String()
	// The test cluster is disposable: skip fsync so start-up and writes stay fast.
	cfg.UnsafeNoFsync = true

	server, err := embed.StartEtcd(cfg)
	if err != nil {
		log.Fatalf("start etcd: %v", err)
	}
	defer server.Close()

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)
	select {
	case <-server.Server.ReadyNotify():
		log.Printf("etcd ready, serving clients on %s", client.String())
	case err := <-server.Err():
		log.Fatalf("etcd failed before ready: %v", err)
	case sig := <-signals:
		log.Printf("received %s before ready, stopping", sig)
		return
	}
	select {
	case err := <-server.Err():
		log.Fatalf("etcd stopped: %v", err)
	case sig := <-signals:
		log.Printf("received %s, stopping", sig)
	}
}
