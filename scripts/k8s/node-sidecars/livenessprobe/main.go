// Command livenessprobe answers a kubelet liveness probe for a CSI plugin,
// as kubernetes-csi/livenessprobe does (that module is not served by the Go
// module proxy this project builds from), with the flags the cinderblock
// chart passes: --csi-address (the plugin's socket) and --http-endpoint
// (default :9808). GET /healthz calls the plugin's CSI Probe: 200 when it
// answers ready (or leaves ready unset), 500 otherwise.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net/http"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

var version = "unknown"

func main() {
	csiAddress := flag.String("csi-address", "/run/csi/socket", "the CSI plugin's socket")
	httpEndpoint := flag.String("http-endpoint", ":9808", "address of the /healthz endpoint")
	probeTimeout := flag.Duration("probe-timeout", 3*time.Second, "how long one Probe call may take")
	showVersion := flag.Bool("version", false, "print the version and exit")
	flag.Int("v", 0, "log level (accepted for compatibility; ignored)")
	flag.Parse()
	if *showVersion {
		fmt.Println(version)
		return
	}
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	target := *csiAddress
	if !strings.HasPrefix(target, "unix://") {
		target = "unix://" + target
	}
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatalf("CSI address %s: %v", *csiAddress, err)
	}
	identity := csi.NewIdentityClient(conn)
	http.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), *probeTimeout)
		defer cancel()
		resp, err := identity.Probe(ctx, &csi.ProbeRequest{})
		if err != nil {
			log.Printf("probe failed: %v", err)
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		if ready := resp.GetReady(); ready != nil && !ready.GetValue() {
			http.Error(w, "driver is not ready", http.StatusInternalServerError)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	log.Printf("livenessprobe %s: probing %s, serving /healthz on %s", version, *csiAddress, *httpEndpoint)
	log.Fatal(http.ListenAndServe(*httpEndpoint, nil))
}
