// Command volume-data-source-validator warns about claims whose
// dataSourceRef names a kind nothing populates, as
// kubernetes-csi/volume-data-source-validator does (the Go module proxy this
// project builds from does not serve that module); written here with the
// flags Kubernetes' e2e manifest passes (--v, --leader-election).
//
// Every few seconds it lists the VolumePopulators
// (populator.storage.k8s.io/v1beta1) and the unbound claims; a claim whose
// dataSourceRef is neither a claim nor a VolumeSnapshot and whose group and
// kind no VolumePopulator registers gets one Warning event,
// UnrecognizedDataSourceKind.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net/http"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

var version = "unknown"

var populatorGVR = schema.GroupVersionResource{Group: "populator.storage.k8s.io", Version: "v1beta1", Resource: "volumepopulators"}

func main() {
	kubeconfig := flag.String("kubeconfig", "", "a kubeconfig (empty: in-cluster)")
	httpEndpoint := flag.String("http-endpoint", "", "address of the /healthz endpoint (empty: none)")
	resync := flag.Duration("resync-period", 5*time.Second, "how often claims are checked")
	showVersion := flag.Bool("version", false, "print the version and exit")
	flag.Int("v", 0, "log level (accepted for compatibility; ignored)")
	flag.Bool("leader-election", false, "accepted for compatibility; one replica runs without it")
	flag.Parse()
	if *showVersion {
		fmt.Println(version)
		return
	}
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	var cfg *rest.Config
	var err error
	if *kubeconfig != "" {
		cfg, err = clientcmd.BuildConfigFromFlags("", *kubeconfig)
	} else {
		cfg, err = rest.InClusterConfig()
	}
	if err != nil {
		log.Fatal(err)
	}
	if *httpEndpoint != "" {
		go func() {
			mux := http.NewServeMux()
			mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
			log.Fatal(http.ListenAndServe(*httpEndpoint, mux))
		}()
	}
	kube := kubernetes.NewForConfigOrDie(cfg)
	dyn := dynamic.NewForConfigOrDie(cfg)
	log.Printf("volume-data-source-validator %s", version)
	warned := map[types.UID]bool{}
	ctx := context.Background()
	for {
		if err := check(ctx, kube, dyn, warned); err != nil {
			log.Print(err)
		}
		time.Sleep(*resync)
	}
}

func check(ctx context.Context, kube kubernetes.Interface, dyn dynamic.Interface, warned map[types.UID]bool) error {
	pops, err := dyn.Resource(populatorGVR).List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("listing VolumePopulators: %w", err)
	}
	known := map[schema.GroupKind]bool{}
	for _, p := range pops.Items {
		group, _, _ := unstructured.NestedString(p.Object, "sourceKind", "group")
		kind, _, _ := unstructured.NestedString(p.Object, "sourceKind", "kind")
		known[schema.GroupKind{Group: group, Kind: kind}] = true
	}
	claims, err := kube.CoreV1().PersistentVolumeClaims("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("listing claims: %w", err)
	}
	seen := map[types.UID]bool{}
	for i := range claims.Items {
		pvc := &claims.Items[i]
		seen[pvc.UID] = true
		ref := pvc.Spec.DataSourceRef
		if ref == nil || pvc.Spec.VolumeName != "" || warned[pvc.UID] {
			continue
		}
		gk := schema.GroupKind{Kind: ref.Kind}
		if ref.APIGroup != nil {
			gk.Group = *ref.APIGroup
		}
		if (gk.Group == "" && gk.Kind == "PersistentVolumeClaim") ||
			(gk.Group == "snapshot.storage.k8s.io" && gk.Kind == "VolumeSnapshot") || known[gk] {
			continue
		}
		msg := fmt.Sprintf("The datasource for this PVC does not match any registered VolumePopulator: %s", gk)
		ev := &corev1.Event{
			ObjectMeta: metav1.ObjectMeta{GenerateName: pvc.Name + ".", Namespace: pvc.Namespace},
			InvolvedObject: corev1.ObjectReference{
				Kind: "PersistentVolumeClaim", APIVersion: "v1", Namespace: pvc.Namespace, Name: pvc.Name,
				UID: pvc.UID, ResourceVersion: pvc.ResourceVersion,
			},
			Reason: "UnrecognizedDataSourceKind", Message: msg, Type: corev1.EventTypeWarning,
			Source:         corev1.EventSource{Component: "volume-data-source-validator"},
			FirstTimestamp: metav1.Now(), LastTimestamp: metav1.Now(), Count: 1,
		}
		if _, err := kube.CoreV1().Events(pvc.Namespace).Create(ctx, ev, metav1.CreateOptions{}); err != nil {
			log.Printf("claim %s/%s: event: %v", pvc.Namespace, pvc.Name, err)
			continue
		}
		log.Printf("claim %s/%s: %s", pvc.Namespace, pvc.Name, msg)
		warned[pvc.UID] = true
	}
	for uid := range warned {
		if !seen[uid] {
			delete(warned, uid)
		}
	}
	return nil
}
