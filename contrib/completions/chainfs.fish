# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_chainfs_global_optspecs
    string join \n f/foreground read-only allow-other force-share threads= cache-size= log-file= o= h/help V/version
end

function __fish_chainfs_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_chainfs_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_chainfs_using_subcommand
    set -l cmd (__fish_chainfs_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c chainfs -n "__fish_chainfs_needs_command" -l threads -d 'Number of threads serving requests (default: one per CPU, 2 to 16)' -r
complete -c chainfs -n "__fish_chainfs_needs_command" -l cache-size -d 'Metadata cache budget of the whole mount in bytes (default 16M), shared by every image of the chain; K, M or G suffixes (powers of 1024) are accepted' -r
complete -c chainfs -n "__fish_chainfs_needs_command" -l log-file -d 'Write the daemon\'s log to PATH' -r -F
complete -c chainfs -n "__fish_chainfs_needs_command" -s o -d 'Mount options, comma-separated, as mount(8) and fstab pass them: ro, rw, allow_other, force_share, threads=N, cache_size=SIZE, log_file=PATH; generic ones (defaults, nofail, noauto, user, _netdev, x-systemd.*, dev, suid, exec and their no forms) are ignored' -r
complete -c chainfs -n "__fish_chainfs_needs_command" -s f -l foreground -d 'Stay attached and log to stderr; SIGINT or SIGTERM unmount cleanly'
complete -c chainfs -n "__fish_chainfs_needs_command" -l read-only -d 'Make every node file read-only; commands are refused with EROFS'
complete -c chainfs -n "__fish_chainfs_needs_command" -l allow-other -d 'Let users other than the one mounting access the mount'
complete -c chainfs -n "__fish_chainfs_needs_command" -l force-share -d 'Ignore image locks, as `qemu-img -U` does; implies --read-only'
complete -c chainfs -n "__fish_chainfs_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c chainfs -n "__fish_chainfs_needs_command" -s V -l version -d 'Print version'
complete -c chainfs -n "__fish_chainfs_needs_command" -a "mount" -d 'Mount IMAGE\'s whole backing chain at MOUNTPOINT'
complete -c chainfs -n "__fish_chainfs_needs_command" -a "umount" -d 'Unmount MOUNTPOINT; returns once the daemon has written everything and released the images'
complete -c chainfs -n "__fish_chainfs_needs_command" -a "info" -d 'Print the chain of IMAGE, top first'
complete -c chainfs -n "__fish_chainfs_needs_command" -a "status" -d 'Print the jobs of a mount'
complete -c chainfs -n "__fish_chainfs_needs_command" -a "demo" -d 'Create and mount a five-image demo chain in DIR'
complete -c chainfs -n "__fish_chainfs_needs_command" -a "completions" -d 'Print a completion script for SHELL, generated from this command line'
complete -c chainfs -n "__fish_chainfs_needs_command" -a "man" -d 'Print the manual page (roff), generated from this command line'
complete -c chainfs -n "__fish_chainfs_needs_command" -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c chainfs -n "__fish_chainfs_using_subcommand mount" -l threads -d 'Number of threads serving requests (default: one per CPU, 2 to 16)' -r
complete -c chainfs -n "__fish_chainfs_using_subcommand mount" -l cache-size -d 'Metadata cache budget of the whole mount in bytes (default 16M), shared by every image of the chain; K, M or G suffixes (powers of 1024) are accepted' -r
complete -c chainfs -n "__fish_chainfs_using_subcommand mount" -l log-file -d 'Write the daemon\'s log to PATH' -r -F
complete -c chainfs -n "__fish_chainfs_using_subcommand mount" -s o -d 'Mount options, comma-separated, as mount(8) and fstab pass them: ro, rw, allow_other, force_share, threads=N, cache_size=SIZE, log_file=PATH; generic ones (defaults, nofail, noauto, user, _netdev, x-systemd.*, dev, suid, exec and their no forms) are ignored' -r
complete -c chainfs -n "__fish_chainfs_using_subcommand mount" -s f -l foreground -d 'Stay attached and log to stderr; SIGINT or SIGTERM unmount cleanly'
complete -c chainfs -n "__fish_chainfs_using_subcommand mount" -l read-only -d 'Make every node file read-only; commands are refused with EROFS'
complete -c chainfs -n "__fish_chainfs_using_subcommand mount" -l allow-other -d 'Let users other than the one mounting access the mount'
complete -c chainfs -n "__fish_chainfs_using_subcommand mount" -l force-share -d 'Ignore image locks, as `qemu-img -U` does; implies --read-only'
complete -c chainfs -n "__fish_chainfs_using_subcommand mount" -s h -l help -d 'Print help'
complete -c chainfs -n "__fish_chainfs_using_subcommand umount" -s h -l help -d 'Print help'
complete -c chainfs -n "__fish_chainfs_using_subcommand info" -l json -d 'Print a JSON array instead of text'
complete -c chainfs -n "__fish_chainfs_using_subcommand info" -s h -l help -d 'Print help'
complete -c chainfs -n "__fish_chainfs_using_subcommand status" -l wait -d 'Draw progress until every job has finished'
complete -c chainfs -n "__fish_chainfs_using_subcommand status" -l json -d 'Print `ctl/status.json` instead of `ctl/status`'
complete -c chainfs -n "__fish_chainfs_using_subcommand status" -s h -l help -d 'Print help'
complete -c chainfs -n "__fish_chainfs_using_subcommand demo" -s h -l help -d 'Print help'
complete -c chainfs -n "__fish_chainfs_using_subcommand completions" -s h -l help -d 'Print help'
complete -c chainfs -n "__fish_chainfs_using_subcommand man" -s h -l help -d 'Print help'
complete -c chainfs -n "__fish_chainfs_using_subcommand help; and not __fish_seen_subcommand_from mount umount info status demo completions man help" -f -a "mount" -d 'Mount IMAGE\'s whole backing chain at MOUNTPOINT'
complete -c chainfs -n "__fish_chainfs_using_subcommand help; and not __fish_seen_subcommand_from mount umount info status demo completions man help" -f -a "umount" -d 'Unmount MOUNTPOINT; returns once the daemon has written everything and released the images'
complete -c chainfs -n "__fish_chainfs_using_subcommand help; and not __fish_seen_subcommand_from mount umount info status demo completions man help" -f -a "info" -d 'Print the chain of IMAGE, top first'
complete -c chainfs -n "__fish_chainfs_using_subcommand help; and not __fish_seen_subcommand_from mount umount info status demo completions man help" -f -a "status" -d 'Print the jobs of a mount'
complete -c chainfs -n "__fish_chainfs_using_subcommand help; and not __fish_seen_subcommand_from mount umount info status demo completions man help" -f -a "demo" -d 'Create and mount a five-image demo chain in DIR'
complete -c chainfs -n "__fish_chainfs_using_subcommand help; and not __fish_seen_subcommand_from mount umount info status demo completions man help" -f -a "completions" -d 'Print a completion script for SHELL, generated from this command line'
complete -c chainfs -n "__fish_chainfs_using_subcommand help; and not __fish_seen_subcommand_from mount umount info status demo completions man help" -f -a "man" -d 'Print the manual page (roff), generated from this command line'
complete -c chainfs -n "__fish_chainfs_using_subcommand help; and not __fish_seen_subcommand_from mount umount info status demo completions man help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
