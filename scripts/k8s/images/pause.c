/* The pod sandbox process of the test cluster's pause image: it holds the
 * pod's namespaces, reaps the zombies a shared PID namespace hands it, and
 * exits on SIGTERM or SIGINT. Built static by scripts/k8s/images.sh. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) {
	(void)sig;
	_exit(0);
}

static void reap(int sig) {
	(void)sig;
	while (waitpid(-1, NULL, WNOHANG) > 0) {
	}
}

int main(void) {
	if (getpid() != 1)
		fprintf(stderr, "pause: not PID 1; zombies of this namespace are not mine to reap\n");
	struct sigaction sa = {0};
	sa.sa_handler = stop;
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	sa.sa_handler = reap;
	sa.sa_flags = SA_NOCLDSTOP;
	sigaction(SIGCHLD, &sa, NULL);
	for (;;)
		pause();
}
