/*
 * curl_floor.c: the floor of aigate's start-up, a program that only initialises libcurl (the first
 * thing aigate does that costs anything: TLS library set-up) and cleans up. startup.sh times aigate's
 * commands against it, side by side, as absolute times move between machines.
 */
#include <curl/curl.h>

int main(void)
{
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
        return 1;
    curl_global_cleanup();
    return 0;
}
