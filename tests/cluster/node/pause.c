/* The pod sandbox process (the "pause" container): holds the pod's namespaces, sleeps, reaps
 * orphans, exits on SIGINT/SIGTERM. Built static by tests/cluster/node-up.sh into a one-file image. */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void die(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }

int main(void) {
  signal(SIGINT, die);
  signal(SIGTERM, die);
  signal(SIGCHLD, reap);
  for (;;) pause();
}
