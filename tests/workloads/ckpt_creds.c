/* Run as an unprivileged user: after restore by root it must still be that user, with the
 * same groups, capabilities, umask and name. */
#include "ckpt_common.h"
#include <grp.h>
#include <linux/capability.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>

struct ident { uid_t r, e, s; gid_t gr, ge, gs; int ngroups; gid_t groups[64];
               struct __user_cap_data_struct caps[2]; mode_t umask; char name[16]; int nnp; };

static void snapshot(struct ident *id) {
    memset(id, 0, sizeof *id);
    getresuid(&id->r, &id->e, &id->s);
    getresgid(&id->gr, &id->ge, &id->gs);
    id->ngroups = getgroups(64, id->groups);
    struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };
    syscall(SYS_capget, &h, id->caps);
    id->umask = umask(0); umask(id->umask);
    prctl(PR_GET_NAME, id->name);
    id->nnp = prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0);
}

int main(int argc, char **argv) {
    init(argc, argv);
    umask(027);
    prctl(PR_SET_NAME, "kcr-creds");
    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    FILE *out = open_output();
    struct ident before, after;
    snapshot(&before);
    ready();
    linger(80);
    snapshot(&after);
    fprintf(out, "uid %d/%d/%d gid %d/%d/%d groups %d caps %x umask %o name %s nnp %d\n",
            after.r, after.e, after.s, after.gr, after.ge, after.gs, after.ngroups,
            after.caps[0].effective, after.umask, after.name, after.nnp);
    verdict(memcmp(&before, &after, sizeof before) == 0, "identity changed");
    return 0;
}
