/* The commands of the moe tool: each takes the arguments after its name and returns the
 * exit code (0 ok, 1 runtime error, 2 usage error). */
#ifndef MOE_TOOLS_CLI_H
#define MOE_TOOLS_CLI_H

int moe_cmd_demo(int argc, char **argv);
int moe_cmd_prepare(int argc, char **argv);
int moe_cmd_train(int argc, char **argv);

#endif
