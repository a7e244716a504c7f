// compose-config: loads and validates a Compose file with compose-go, the
// library `docker compose` itself uses (same JSON schema, interpolation,
// merge keys, depends_on conditions), and prints the resolved model as YAML.
// It stands in for `docker compose config` where the compose plugin is not
// installed; scripts/check-compose runs it when Go is available.
//
//	go run ./docker/tools/compose-config [-q] docker-compose.yml [override.yml ...]
package main

import (
	"context"
	"flag"
	"fmt"
	"os"

	"github.com/compose-spec/compose-go/v2/cli"
)

func main() {
	quiet := flag.Bool("q", false, "only validate, print nothing")
	flag.Parse()
	files := flag.Args()
	if len(files) == 0 {
		files = []string{"docker-compose.yml"}
	}
	opts, err := cli.NewProjectOptions(files,
		cli.WithOsEnv, cli.WithDotEnv, cli.WithInterpolation(true), cli.WithResolvedPaths(true))
	if err != nil {
		fmt.Fprintln(os.Stderr, "compose-config:", err)
		os.Exit(1)
	}
	project, err := opts.LoadProject(context.Background())
	if err != nil {
		fmt.Fprintln(os.Stderr, "compose-config: invalid:", err)
		os.Exit(1)
	}
	if *quiet {
		return
	}
	out, err := project.MarshalYAML()
	if err != nil {
		fmt.Fprintln(os.Stderr, "compose-config:", err)
		os.Exit(1)
	}
	os.Stdout.Write(out)
}
