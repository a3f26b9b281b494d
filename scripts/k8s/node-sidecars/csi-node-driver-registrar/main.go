// Command csi-node-driver-registrar registers a CSI node plugin with the
// kubelet, as kubernetes-csi/node-driver-registrar does (that module is not
// served by the Go module proxy this project builds from). It takes the same
// flags the cinderblock chart passes:
//
//	--csi-address               the plugin's CSI socket, as this container sees it
//	--kubelet-registration-path the same socket, as the kubelet sees it
//	--plugin-registration-path  the kubelet's plugins_registry folder (default /registration)
//	--http-endpoint             serve /healthz here (empty: no HTTP server)
//
// It asks the plugin for its name (CSI GetPluginInfo), then serves the
// kubelet's plugin-registration API (k8s.io/kubelet pluginregistration/v1)
// on PLUGIN_REGISTRATION_PATH/NAME-reg.sock. The kubelet's plugin watcher
// finds that socket, calls GetInfo, connects to the CSI socket, and reports
// the result with NotifyRegistrationStatus. /healthz answers 200 while the
// registration socket exists and the kubelet has not refused the plugin.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registration "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

var version = "unknown"

type registrar struct {
	registration.UnimplementedRegistrationServer
	name, endpoint string
	refused        atomic.Value // string: the kubelet's last error, "" when registered
}

func (r *registrar) GetInfo(context.Context, *registration.InfoRequest) (*registration.PluginInfo, error) {
	log.Printf("kubelet asked for the plugin's info: %s at %s", r.name, r.endpoint)
	return &registration.PluginInfo{
		Type:              registration.CSIPlugin,
		Name:              r.name,
		Endpoint:          r.endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (r *registrar) NotifyRegistrationStatus(_ context.Context, s *registration.RegistrationStatus) (*registration.RegistrationStatusResponse, error) {
	if s.PluginRegistered {
		log.Printf("kubelet registered %s", r.name)
		r.refused.Store("")
	} else {
		log.Printf("kubelet refused %s: %s", r.name, s.Error)
		r.refused.Store(s.Error)
	}
	return &registration.RegistrationStatusResponse{}, nil
}

// driverName asks the CSI plugin at address for its name, retrying until ctx ends.
func driverName(ctx context.Context, address string) (string, error) {
	target := address
	if !strings.HasPrefix(target, "unix://") {
		target = "unix://" + target
	}
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return "", err
	}
	defer conn.Close()
	client := csi.NewIdentityClient(conn)
	for {
		callCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
		info, err := client.GetPluginInfo(callCtx, &csi.GetPluginInfoRequest{})
		cancel()
		if err == nil {
			if info.GetName() == "" {
				return "", errors.New("GetPluginInfo returned an empty name")
			}
			return info.GetName(), nil
		}
		log.Printf("waiting for the CSI plugin at %s: %v", address, err)
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

func main() {
	csiAddress := flag.String("csi-address", "/run/csi/socket", "the CSI plugin's socket in this container")
	kubeletPath := flag.String("kubelet-registration-path", "", "the CSI plugin's socket as the kubelet sees it (required)")
	registry := flag.String("plugin-registration-path", "/registration", "the kubelet's plugins_registry folder in this container")
	httpEndpoint := flag.String("http-endpoint", "", "address of the /healthz endpoint; empty for none")
	connectTimeout := flag.Duration("timeout", 5*time.Minute, "how long to wait for the CSI plugin at start")
	showVersion := flag.Bool("version", false, "print the version and exit")
	flag.Int("v", 0, "log level (accepted for compatibility; ignored)")
	flag.Parse()
	if *showVersion {
		fmt.Println(version)
		return
	}
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	if *kubeletPath == "" {
		log.Fatal("--kubelet-registration-path is required")
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	startCtx, cancel := context.WithTimeout(ctx, *connectTimeout)
	name, err := driverName(startCtx, *csiAddress)
	cancel()
	if err != nil {
		log.Fatalf("asking the CSI plugin at %s for its name: %v", *csiAddress, err)
	}
	sock := filepath.Join(*registry, name+"-reg.sock")
	if err := os.Remove(sock); err != nil && !errors.Is(err, os.ErrNotExist) {
		log.Fatalf("removing the old %s: %v", sock, err)
	}
	lis, err := net.Listen("unix", sock)
	if err != nil {
		log.Fatalf("listening on %s: %v", sock, err)
	}
	reg := &registrar{name: name, endpoint: *kubeletPath}
	reg.refused.Store("")
	server := grpc.NewServer()
	registration.RegisterRegistrationServer(server, reg)
	log.Printf("%s %s: registering %s (kubelet path %s) through %s", filepath.Base(os.Args[0]), version, name, *kubeletPath, sock)

	if *httpEndpoint != "" {
		mux := http.NewServeMux()
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
			if _, err := os.Stat(sock); err != nil {
				http.Error(w, fmt.Sprintf("registration socket: %v", err), http.StatusInternalServerError)
				return
			}
			if msg := reg.refused.Load().(string); msg != "" {
				http.Error(w, "kubelet refused the plugin: "+msg, http.StatusInternalServerError)
				return
			}
			fmt.Fprintln(w, "ok")
		})
		go func() {
			if err := http.ListenAndServe(*httpEndpoint, mux); err != nil {
				log.Fatalf("health endpoint %s: %v", *httpEndpoint, err)
			}
		}()
	}
	go func() {
		<-ctx.Done()
		server.GracefulStop()
	}()
	if err := server.Serve(lis); err != nil {
		log.Fatalf("serving %s: %v", sock, err)
	}
	os.Remove(sock)
	log.Print("stopped")
}
