// Command hello-populator is the sample volume populator Kubernetes' e2e
// suite deploys for "provisioning should provision storage with any volume
// data source" (kubernetes-csi/lib-volume-populator's example; the Go module
// proxy this project builds from does not serve that module). It takes the
// same flags and does the same work, written here:
//
//	--mode=controller --image-name=IMAGE --namespace=NS [--http-endpoint=:8080]
//
// watches claims whose dataSourceRef is a hello.example.com Hello. For each,
// once the claim's node is chosen (WaitForFirstConsumer) it makes a "prime"
// claim with the same class, size and modes in NS, and a pod of IMAGE in
// --mode=populate that writes the Hello's spec.fileContents into
// spec.fileName at the root of the prime volume. When the pod has
// succeeded it points the prime volume's claimRef at the user's claim, so
// the PersistentVolume controller binds the volume there, then deletes the
// pod and the prime claim.
//
//	--mode=populate --file-name=NAME --file-contents=TEXT [--mount-path=/mnt]
//
// writes the file (temp, fsync, rename, fsync of the folder) and exits.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net/http"
	"os"
	"path/filepath"
	"time"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
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

const (
	helloGroup      = "hello.example.com"
	helloKind       = "Hello"
	annSelectedNode = "volume.kubernetes.io/selected-node"
	populatorMount  = "/mnt"
)

var helloGVR = schema.GroupVersionResource{Group: helloGroup, Version: "v1alpha1", Resource: "hellos"}

func main() {
	mode := flag.String("mode", "", "controller or populate")
	imageName := flag.String("image-name", "", "controller: the image of the populator pods")
	namespace := flag.String("namespace", "hello", "controller: where the prime claims and populator pods go")
	httpEndpoint := flag.String("http-endpoint", "", "controller: address of the /healthz endpoint (empty: none)")
	kubeconfig := flag.String("kubeconfig", "", "controller: a kubeconfig (empty: in-cluster)")
	fileName := flag.String("file-name", "", "populate: the file to write")
	fileContents := flag.String("file-contents", "", "populate: what to write in it")
	mountPath := flag.String("mount-path", populatorMount, "populate: where the volume is mounted")
	showVersion := flag.Bool("version", false, "print the version and exit")
	flag.Int("v", 0, "log level (accepted for compatibility; ignored)")
	flag.Parse()
	if *showVersion {
		fmt.Println(version)
		return
	}
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	switch *mode {
	case "populate":
		if *fileName == "" || filepath.Base(*fileName) != *fileName {
			log.Fatalf("--file-name must be a plain file name, got %q", *fileName)
		}
		if err := writeFile(filepath.Join(*mountPath, *fileName), []byte(*fileContents)); err != nil {
			log.Fatal(err)
		}
		log.Printf("wrote %d bytes to %s", len(*fileContents), filepath.Join(*mountPath, *fileName))
	case "controller":
		if *imageName == "" {
			log.Fatal("--image-name is required in controller mode")
		}
		cfg, err := restConfig(*kubeconfig)
		if err != nil {
			log.Fatal(err)
		}
		if *httpEndpoint != "" {
			go serveHealth(*httpEndpoint)
		}
		c := &controller{
			kube:      kubernetes.NewForConfigOrDie(cfg),
			dyn:       dynamic.NewForConfigOrDie(cfg),
			image:     *imageName,
			namespace: *namespace,
		}
		log.Printf("hello-populator %s: controller, populator pods in %s with %s", version, c.namespace, c.image)
		c.run(context.Background())
	default:
		log.Fatalf("--mode must be controller or populate, got %q", *mode)
	}
}

func restConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig != "" {
		return clientcmd.BuildConfigFromFlags("", kubeconfig)
	}
	return rest.InClusterConfig()
}

func serveHealth(addr string) {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	log.Fatal(http.ListenAndServe(addr, mux))
}

// writeFile replaces PATH with DATA crash-safely.
func writeFile(path string, data []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	d, err := os.Open(filepath.Dir(path))
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

type controller struct {
	kube      kubernetes.Interface
	dyn       dynamic.Interface
	image     string
	namespace string
}

// run checks every claim every two seconds (a small poll: the suite makes
// one claim at a time).
func (c *controller) run(ctx context.Context) {
	for {
		claims, err := c.kube.CoreV1().PersistentVolumeClaims("").List(ctx, metav1.ListOptions{})
		if err != nil {
			log.Printf("listing claims: %v", err)
		} else {
			for i := range claims.Items {
				pvc := &claims.Items[i]
				ref := pvc.Spec.DataSourceRef
				if ref == nil || ref.APIGroup == nil || *ref.APIGroup != helloGroup || ref.Kind != helloKind {
					continue
				}
				if err := c.sync(ctx, pvc); err != nil {
					log.Printf("claim %s/%s: %v", pvc.Namespace, pvc.Name, err)
				}
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(2 * time.Second):
		}
	}
}

func primeName(pvc *corev1.PersistentVolumeClaim) string { return "prime-" + string(pvc.UID) }
func podName(pvc *corev1.PersistentVolumeClaim) string   { return "populate-" + string(pvc.UID) }

// sync moves one claim a step on; every step is idempotent.
func (c *controller) sync(ctx context.Context, pvc *corev1.PersistentVolumeClaim) error {
	core := c.kube.CoreV1()
	if pvc.Spec.VolumeName != "" {
		// Bound: the pod and the prime claim are no longer needed.
		if err := ignoreNotFound(core.Pods(c.namespace).Delete(ctx, podName(pvc), metav1.DeleteOptions{})); err != nil {
			return err
		}
		return ignoreNotFound(core.PersistentVolumeClaims(c.namespace).Delete(ctx, primeName(pvc), metav1.DeleteOptions{}))
	}
	hello, err := c.dyn.Resource(helloGVR).Namespace(pvc.Namespace).Get(ctx, pvc.Spec.DataSourceRef.Name, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("Hello %s: %w", pvc.Spec.DataSourceRef.Name, err)
	}
	fileName, _, _ := unstructured.NestedString(hello.Object, "spec", "fileName")
	contents, _, _ := unstructured.NestedString(hello.Object, "spec", "fileContents")
	if fileName == "" {
		return fmt.Errorf("Hello %s has no spec.fileName", hello.GetName())
	}
	if pvc.Spec.VolumeMode != nil && *pvc.Spec.VolumeMode == corev1.PersistentVolumeBlock {
		return fmt.Errorf("block claims are not supported (the populator writes a file)")
	}
	if pvc.Spec.StorageClassName == nil || *pvc.Spec.StorageClassName == "" {
		return fmt.Errorf("no storage class")
	}
	sc, err := c.kube.StorageV1().StorageClasses().Get(ctx, *pvc.Spec.StorageClassName, metav1.GetOptions{})
	if err != nil {
		return err
	}
	node := ""
	if sc.VolumeBindingMode != nil && *sc.VolumeBindingMode == storagev1.VolumeBindingWaitForFirstConsumer {
		node = pvc.Annotations[annSelectedNode]
		if node == "" {
			return nil // no consumer scheduled yet
		}
	}

	prime, err := core.PersistentVolumeClaims(c.namespace).Get(ctx, primeName(pvc), metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		prime, err = core.PersistentVolumeClaims(c.namespace).Create(ctx, primeClaim(pvc, c.namespace, node), metav1.CreateOptions{})
		if err == nil {
			log.Printf("claim %s/%s: created %s/%s", pvc.Namespace, pvc.Name, c.namespace, prime.Name)
		}
	}
	if err != nil {
		return err
	}

	pod, err := core.Pods(c.namespace).Get(ctx, podName(pvc), metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		pod, err = core.Pods(c.namespace).Create(ctx, c.populatorPod(pvc, node, fileName, contents), metav1.CreateOptions{})
		if err == nil {
			log.Printf("claim %s/%s: created pod %s/%s", pvc.Namespace, pvc.Name, c.namespace, pod.Name)
		}
	}
	if err != nil {
		return err
	}
	switch pod.Status.Phase {
	case corev1.PodFailed:
		log.Printf("claim %s/%s: populator pod failed, making it again", pvc.Namespace, pvc.Name)
		return ignoreNotFound(core.Pods(c.namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{}))
	case corev1.PodSucceeded:
	default:
		return nil
	}
	if prime.Spec.VolumeName == "" {
		return nil
	}
	pv, err := core.PersistentVolumes().Get(ctx, prime.Spec.VolumeName, metav1.GetOptions{})
	if err != nil {
		return err
	}
	if pv.Spec.ClaimRef != nil && pv.Spec.ClaimRef.UID == pvc.UID {
		return nil // handed over; the PersistentVolume controller binds it
	}
	// Hand the populated volume to the user's claim. The patch carries the
	// volume's resourceVersion, so a concurrent change makes it fail and the
	// next pass tries again (the suite's role grants patch, not update).
	patch, err := json.Marshal(map[string]any{
		"metadata": map[string]any{"resourceVersion": pv.ResourceVersion},
		"spec": map[string]any{"claimRef": map[string]any{
			"kind": "PersistentVolumeClaim", "apiVersion": "v1", "namespace": pvc.Namespace,
			"name": pvc.Name, "uid": pvc.UID, "resourceVersion": pvc.ResourceVersion,
		}},
	})
	if err != nil {
		return err
	}
	if _, err := core.PersistentVolumes().Patch(ctx, pv.Name, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		return err
	}
	log.Printf("claim %s/%s: volume %s populated, handed over", pvc.Namespace, pvc.Name, pv.Name)
	return nil
}

func primeClaim(pvc *corev1.PersistentVolumeClaim, namespace, node string) *corev1.PersistentVolumeClaim {
	prime := &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: primeName(pvc), Namespace: namespace},
		Spec: corev1.PersistentVolumeClaimSpec{
			AccessModes:      pvc.Spec.AccessModes,
			Resources:        corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{}},
			StorageClassName: pvc.Spec.StorageClassName,
			VolumeMode:       pvc.Spec.VolumeMode,
		},
	}
	if q, ok := pvc.Spec.Resources.Requests[corev1.ResourceStorage]; ok {
		prime.Spec.Resources.Requests[corev1.ResourceStorage] = q
	} else {
		prime.Spec.Resources.Requests[corev1.ResourceStorage] = resource.MustParse("1Mi")
	}
	if node != "" {
		prime.Annotations = map[string]string{annSelectedNode: node}
	}
	return prime
}

func (c *controller) populatorPod(pvc *corev1.PersistentVolumeClaim, node, fileName, contents string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: podName(pvc), Namespace: c.namespace},
		Spec: corev1.PodSpec{
			RestartPolicy: corev1.RestartPolicyNever,
			NodeName:      node,
			Containers: []corev1.Container{{
				Name:            "populate",
				Image:           c.image,
				ImagePullPolicy: corev1.PullIfNotPresent,
				Args: []string{"--mode=populate", "--file-name=" + fileName, "--file-contents=" + contents,
					"--mount-path=" + populatorMount},
				VolumeMounts: []corev1.VolumeMount{{Name: "target", MountPath: populatorMount}},
			}},
			Volumes: []corev1.Volume{{
				Name: "target",
				VolumeSource: corev1.VolumeSource{
					PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: primeName(pvc)},
				},
			}},
		},
	}
}

func ignoreNotFound(err error) error {
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}
